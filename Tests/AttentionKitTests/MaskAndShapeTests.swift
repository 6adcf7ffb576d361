import AttentionKit
import Foundation
import Testing
import _TestSupport

/// Shape validation of the kernels, masks that do not broadcast, `Tensor`'s initializers, and
/// `matmul` against a plain Double loop.
@Suite("Shapes, masks and matmul")
struct MaskAndShapeTests {
  /// A deterministic, non-trivial tensor: element e is sin(e + 1)·2 + 0.5·(e % 3), rounded.
  static func filled(_ shape: [Int], offset: Int = 0) throws -> Tensor {
    let count = shape.reduce(1, *)
    var scalars = [Float](repeating: 0, count: count)
    for e in 0..<count {
      let wave: Double = sin(Double(e + offset + 1)) * 2
      scalars[e] = Float(wave + 0.5 * Double(e % 3))
    }
    return try Tensor(shape: shape, scalars: scalars)
  }

  /// Runs both kernels (the materialized one and the reference's initializer) and returns the
  /// errors they throw; both must throw the same `AttentionError`.
  static func attentionErrors(
    q: [Int], k: [Int], v: [Int], mask: AttentionMask = .none,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws -> AttentionError? {
    let (queries, keys, values) = (
      try filled(q), try filled(k, offset: 7), try filled(v, offset: 13)
    )
    let fast = #expect(throws: AttentionError.self, sourceLocation: sourceLocation) {
      _ = try Attention.scaledDotProduct(
        queries: queries, keys: keys, values: values, mask: mask, kernel: .materialized)
    }
    let reference = #expect(throws: AttentionError.self, sourceLocation: sourceLocation) {
      _ = try ReferenceAttention(queries: queries, keys: keys, values: values, mask: mask)
    }
    #expect(
      fast == reference,
      "kernels disagree: \(String(describing: fast)) vs \(String(describing: reference))",
      sourceLocation: sourceLocation)
    return fast
  }

  /// The error must be `shapeMismatch` and its message must name every given fragment.
  static func expectShapeMismatch(
    _ error: AttentionError?, mentions fragments: [String],
    sourceLocation: SourceLocation = #_sourceLocation
  ) {
    guard case .shapeMismatch(let message)? = error else {
      Issue.record(
        "expected shapeMismatch, got \(String(describing: error))", sourceLocation: sourceLocation)
      return
    }
    for fragment in fragments {
      #expect(
        message.contains(fragment), "message \"\(message)\" lacks \"\(fragment)\"",
        sourceLocation: sourceLocation)
    }
    #expect(!message.contains("\n"), "one-line message: \(message)", sourceLocation: sourceLocation)
  }

  @Test("Mismatched batch dimensions throw")
  func batchMismatch() throws {
    let error = try Self.attentionErrors(q: [2, 4, 8], k: [3, 4, 8], v: [3, 4, 8])
    Self.expectShapeMismatch(error, mentions: ["leading dimensions", "[2, 4, 8]", "[3, 4, 8]"])
    let heads = try Self.attentionErrors(q: [2, 2, 4, 8], k: [2, 4, 8], v: [2, 4, 8])
    Self.expectShapeMismatch(heads, mentions: ["[2, 2, 4, 8]", "[2, 4, 8]"])
  }

  @Test("Different head dimensions D throw")
  func headDimMismatch() throws {
    let error = try Self.attentionErrors(q: [1, 4, 8], k: [1, 4, 6], v: [1, 4, 8])
    Self.expectShapeMismatch(error, mentions: ["head dimension", "[1, 4, 8]", "[1, 4, 6]"])
  }

  @Test("Different key counts Tk in K and V throw")
  func keyCountMismatch() throws {
    let error = try Self.attentionErrors(q: [1, 4, 8], k: [1, 5, 8], v: [1, 6, 8])
    Self.expectShapeMismatch(error, mentions: ["Tk", "[1, 5, 8]", "[1, 6, 8]"])
  }

  @Test(
    "Rank below 2 throws",
    arguments: [
      ([8], [4, 8], [4, 8]), ([4, 8], [8], [4, 8]), ([4, 8], [4, 8], [8]), ([], [4, 8], [4, 8]),
    ] as [([Int], [Int], [Int])])
  func rankTooLow(shapes: ([Int], [Int], [Int])) throws {
    let error = try Self.attentionErrors(q: shapes.0, k: shapes.1, v: shapes.2)
    Self.expectShapeMismatch(error, mentions: ["at least 2 dimensions"])
  }

  @Test("Rank 2 inputs (no batch) work and match rank 3 with a batch of 1")
  func rankTwo() throws {
    let (q, k, v) = (
      try Self.filled([4, 8]), try Self.filled([6, 8], offset: 7),
      try Self.filled([6, 5], offset: 13)
    )
    let flat = try Attention.scaledDotProduct(queries: q, keys: k, values: v, kernel: .materialized)
    let batched = try Attention.scaledDotProduct(
      queries: try q.reshaped([1, 4, 8]), keys: try k.reshaped([1, 6, 8]),
      values: try v.reshaped([1, 6, 5]), kernel: .materialized)
    #expect(flat.output.shape == [4, 5] && flat.weights?.shape == [4, 6])
    #expect(flat.output.scalars == batched.output.scalars)
    #expect(flat.weights?.scalars == batched.weights?.scalars)
  }

  @Test(
    "Masks that do not broadcast to [..., Tq, Tk] throw",
    arguments: [
      ([4, 6], "does not broadcast"),  // Tq, Tk swapped
      ([3, 5, 4], "does not broadcast"),  // batch 3 against 2
      ([2, 1, 4], "does not broadcast"),  // Tq 1 broadcasts, Tk 4 ≠ 5
      ([1, 2, 4, 5], "more dimensions"),  // rank 4 > the scores' rank 3
      ([4], "does not broadcast"),  // a vector is aligned with Tk
    ] as [([Int], String)])
  func maskDoesNotBroadcast(maskShape: [Int], phrase: String) throws {
    let keep = try Tensor(shape: maskShape, repeating: 1)
    let error = try Self.attentionErrors(
      q: [2, 4, 8], k: [2, 5, 8], v: [2, 5, 8], mask: .keep(keep))
    Self.expectShapeMismatch(error, mentions: ["mask", phrase, "\(maskShape)", "[2, 4, 5]"])
    let biasError = try Self.attentionErrors(
      q: [2, 4, 8], k: [2, 5, 8], v: [2, 5, 8], mask: .bias(keep))
    Self.expectShapeMismatch(biasError, mentions: ["bias", phrase, "\(maskShape)"])
  }

  @Test(
    "Masks that broadcast are accepted",
    arguments: [[], [1], [5], [4, 1], [1, 5], [4, 5], [2, 1, 5], [1, 4, 5], [2, 4, 5]] as [[Int]])
  func maskBroadcasts(maskShape: [Int]) throws {
    let mask = AttentionMask(
      keep: try Tensor(shape: maskShape, repeating: 1), bias: try Tensor(shape: maskShape))
    let (q, k, v) = (
      try Self.filled([2, 4, 8]), try Self.filled([2, 5, 8], offset: 7),
      try Self.filled([2, 5, 8], offset: 13)
    )
    let masked = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: mask, kernel: .materialized)
    let plain = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, kernel: .materialized)
    // Keep everything, add zero: the very same numbers.
    #expect(masked.weights == plain.weights && masked.output == plain.output)
  }

  /// Any non-zero value of a keep mask keeps (the notebook's `mask == 0` test); only 0 masks.
  @Test("A keep mask keeps every non-zero value and masks only 0")
  func keepValues() throws {
    let (q, k, v) = (
      try Self.filled([1, 3, 4]), try Self.filled([1, 4, 4], offset: 7),
      try Self.filled([1, 4, 2], offset: 13)
    )
    let odd = try Tensor(
      shape: [3, 4], scalars: [1, 0.5, -3, 2, 7, 1e-30, -0.0001, 1, 1, 1, 1, 0])
    let ones = try Tensor(shape: [3, 4], scalars: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    let a = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: .keep(odd), kernel: .materialized)
    let b = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: .keep(ones), kernel: .materialized)
    #expect(a.weights == b.weights && a.output == b.output)
    #expect(a.weights?.scalars[11] == 0)
  }

  // MARK: Tensor

  @Test("Tensor rejects negative dimensions", arguments: [[-1], [2, -3], [0, -1, 4]] as [[Int]])
  func negativeDimension(shape: [Int]) {
    for make in [{ try Tensor(shape: shape) }, { try Tensor(shape: shape, scalars: []) }] {
      let error = #expect(throws: AttentionError.self) { _ = try make() }
      guard case .invalidArgument(let message)? = error else {
        Issue.record("\(shape): expected invalidArgument, got \(String(describing: error))")
        continue
      }
      #expect(message.contains("negative dimension") && message.contains("\(shape)"), "\(message)")
    }
  }

  @Test(
    "Tensor rejects shapes whose element count overflows",
    arguments: [[Int.max, 2], [1 << 32, 1 << 32], [3, Int.max / 2, 0, 5]] as [[Int]])
  func overflow(shape: [Int]) {
    // [3, Int.max/2, 0, 5] overflows before the 0 is reached: the product is checked in order.
    let error = #expect(throws: AttentionError.self) { _ = try Tensor(shape: shape) }
    guard case .invalidArgument(let message)? = error else {
      Issue.record("\(shape): expected invalidArgument, got \(String(describing: error))")
      return
    }
    #expect(message.contains("\(shape)"), "\(message)")
  }

  @Test("Tensor rejects a scalar count that does not match the shape")
  func countMismatch() throws {
    let error = #expect(throws: AttentionError.self) {
      _ = try Tensor(shape: [2, 3], scalars: [1, 2, 3, 4, 5])
    }
    #expect(error == .shapeMismatch("shape [2, 3] holds 6 elements but 5 were given"))
    let reshape = #expect(throws: AttentionError.self) {
      _ = try Self.filled([2, 3]).reshaped([4, 2])
    }
    guard case .shapeMismatch(let message)? = reshape else {
      Issue.record("reshape: \(String(describing: reshape))")
      return
    }
    #expect(message.contains("[4, 2]") && message.contains("8") && message.contains("6"))
  }

  @Test("Tensor basics: row-major indexing, empty and scalar shapes")
  func tensorBasics() throws {
    var t = try Self.filled([2, 3, 4])
    #expect(t[1, 2, 3] == t.scalars[(1 * 3 + 2) * 4 + 3])
    t[0, 1, 2] = 42
    #expect(t.scalars[6] == 42)
    #expect(t.batchShape == [2] && t.batchCount == 2 && t.rank == 3 && t.count == 24)
    #expect(try Tensor(shape: []).count == 1)
    #expect(try Tensor(shape: [3, 0, 5]).count == 0)
    #expect(try Tensor(shape: [4, 5]).batchCount == 1)
  }

  // MARK: matmul

  /// `C = alpha·A·op(B)` in Double with plain loops, and the bound `γ_K·|alpha|·Σ|a·b|` per
  /// element (K products summed in float32 in any order, times alpha: K + 1 roundings).
  static func naiveMatmul(
    _ a: Tensor, _ b: Tensor, transposeRight: Bool, alpha: Float
  ) -> (values: [Double], bounds: [Double], shape: [Int]) {
    let (m, k) = (a.shape[a.rank - 2], a.shape[a.rank - 1])
    let n = transposeRight ? b.shape[b.rank - 2] : b.shape[b.rank - 1]
    var values: [Double] = []
    var bounds: [Double] = []
    for batch in 0..<a.batchCount {
      for i in 0..<m {
        for j in 0..<n {
          var sum = 0.0
          var magnitude = 0.0
          for c in 0..<k {
            let x = Double(a.scalars[batch * m * k + i * k + c])
            let y = Double(
              transposeRight
                ? b.scalars[batch * n * k + j * k + c] : b.scalars[batch * k * n + c * n + j])
            sum += x * y
            magnitude += abs(x * y)
          }
          values.append(Double(alpha) * sum)
          bounds.append(
            Float32Rounding.gamma(k + 1) * abs(Double(alpha)) * magnitude
              + Double(Float.leastNormalMagnitude))
        }
      }
    }
    return (values, bounds, a.batchShape + [m, n])
  }

  @Test(
    "matmul matches a plain Double loop",
    arguments: [
      ([3, 4], [4, 5], false, 1),
      ([2, 3, 7], [2, 7, 2], false, 1),
      ([2, 3, 5, 16], [2, 3, 9, 16], true, 0.25),  // the QKᵀ form with a scale
      ([1, 33, 65], [1, 65, 17], false, -2),
      ([4, 1], [1, 6], false, 1),  // K = 1: an outer product
      ([2, 0, 3], [2, 3, 4], false, 1),  // M = 0
      ([2, 3, 0], [2, 0, 4], false, 1),  // K = 0: all zeros
    ] as [([Int], [Int], Bool, Float)])
  func matmul(left: [Int], right: [Int], transposeRight: Bool, alpha: Float) throws {
    let a = try Self.filled(left)
    let b = try Self.filled(right, offset: 101)
    let c = try a.matmul(b, transposeRight: transposeRight, alpha: alpha)
    let expected = Self.naiveMatmul(a, b, transposeRight: transposeRight, alpha: alpha)
    #expect(c.shape == expected.shape, "shape \(c.shape), expected \(expected.shape)")
    expectClose(
      c.scalars, expected.values, shape: expected.shape, tolerance: { expected.bounds[$0] },
      "matmul \(left) · \(right)\(transposeRight ? "ᵀ" : "") α \(alpha)")
  }

  @Test("matmul rejects mismatched shapes")
  func matmulErrors() throws {
    let inner = #expect(throws: AttentionError.self) {
      _ = try Self.filled([2, 3, 4]).matmul(try Self.filled([2, 5, 6]))
    }
    Self.expectShapeMismatch(inner, mentions: ["inner dimensions", "[2, 3, 4]", "[2, 5, 6]"])
    let batch = #expect(throws: AttentionError.self) {
      _ = try Self.filled([2, 3, 4]).matmul(try Self.filled([3, 4, 6]))
    }
    Self.expectShapeMismatch(batch, mentions: ["leading dimensions", "[2, 3, 4]", "[3, 4, 6]"])
    let rank = #expect(throws: AttentionError.self) {
      _ = try Self.filled([4]).matmul(try Self.filled([4, 2]))
    }
    Self.expectShapeMismatch(rank, mentions: ["rank ≥ 2"])
  }
}
