import Foundation
import Testing

@testable import AttentionKit

/// The kernels' soft-cap, `c·tanh(x/c)` through `fastExp`, against `Foundation.tanh` in float64:
/// within `6u·c` absolutely (the bound `AttentionVerification` allows), from tiny to saturated
/// arguments and on both signs; `±∞` become `±c`, NaN stays NaN.
@Suite("Soft-cap accuracy")
struct SoftcapAccuracyTests {
  @Test("c·tanh(x/c) within 6u·c of float64", arguments: [Float(1), 5, 30, 50])
  func accuracy(c: Float) throws {
    let q = try Tensor(shape: [1, 1, 1, 1], scalars: [1])
    let terms = try ResolvedScoreTerms(
      ScoreTerms(softcap: c), shape: AttentionShape(queries: q, keys: q, values: q),
      mask: .none)
    var xs: [Float] = [0, 1e-30, -1e-30, 1e-7, 0.5, -0.5, 3, -3, 1e3, -1e3, 1e30, -1e30]
    for k in 0..<2000 { xs.append(Float(k - 1000) * c / 97) }
    var row = xs
    row.withUnsafeMutableBufferPointer { terms.capScores($0.baseAddress!, count: $0.count) }
    let bound = 6 * 0x1p-24 * Double(c)
    for (x, y) in zip(xs, row) {
      let exact = Double(c) * tanh(Double(x) / Double(c))
      #expect(abs(Double(y) - exact) <= bound, "x \(x): \(y) vs \(exact)")
    }
    var special: [Float] = [.infinity, -.infinity, .nan]
    special.withUnsafeMutableBufferPointer { terms.capScores($0.baseAddress!, count: 3) }
    #expect(special[0] == c && special[1] == -c && special[2].isNaN)
  }
}
