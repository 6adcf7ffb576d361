import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/fixtures/make_sdpa_fixtures.py` (its docstring is the schema),
/// in `Fixtures/sdpa_gqa`: scaled dot-product attention in PyTorch's semantics with grouped-query
/// heads, both causal alignments, sliding windows, boolean and float masks, a scale override,
/// float16/bfloat16-rounded inputs and decoding against a 4096-key cache.
///
/// Shape legend: `B` batch, `H` query heads, `Hkv` key/value heads (`G = H / Hkv`), `Tq` queries,
/// `Tk` keys, `D` head dimension, `Dv` value dimension. Q `[B, H, Tq, D]`, K `[B, Hkv, Tk, D]`,
/// V `[B, Hkv, Tk, Dv]`; references (`<f8`) `[B, H, Tq, Dv]` and `[B, H, Tq, Tk]`.
package enum SDPAFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/sdpa_gqa`.
  package static let files = FixtureFolder<SDPAManifest>(
    "sdpa_gqa", script: "Scripts/fixtures/make_sdpa_fixtures.py")

  /// The cases of one group (`"gqa"`, `"alignment"`, `"window"`, `"mask"`, `"scale"`, `"half"`,
  /// `"decode"`).
  package static func cases(group: String) throws -> [SDPACase] {
    let found = try cases().filter { $0.group == group }
    guard !found.isEmpty else { throw FixtureError("no SDPA case in group \(group)") }
    return found
  }

  /// The case called `name`.
  package static func sdpaCase(named name: String) throws -> SDPACase { try caseNamed(name) }
}

// MARK: - Manifest schema (see the script's docstring)

package typealias SDPAManifest = CaseManifest<SDPACase>

package struct SDPACase: AttentionFixtureCase {
  /// The half-precision copies of the inputs: `<f2` values for `"float16"`, `<u2` bit patterns
  /// for `"bfloat16"`; the `<f4` inputs hold the same values.
  package struct Half: Decodable, Sendable {
    package var format: String
    package var q: FileRef
    package var k: FileRef
    package var v: FileRef
  }
  package struct Expected: Decodable, Sendable {
    package var output: FileRef
    package var weights: FileRef
  }

  package var name: String
  package var description: String
  package var group: String
  package var q: FileRef
  package var k: FileRef
  package var v: FileRef
  package var heads: Int
  package var kvHeads: Int
  package var groupSize: Int
  package var masks: [MaskRef]
  package var causal: Bool
  /// `"top-left"` or `"bottom-right"`, `CausalAlignment`'s raw values.
  package var alignment: String
  package var window: Int?
  /// The requested scale; `nil` for the default `1/√D`.
  package var scale: Double?
  /// The float32 scale the reference used, widened to Double.
  package var scaleUsed: Double
  package var half: Half?
  package var fullyMaskedRows: Int
  /// `S`: max |scale·q·k| over the pairs that are not masked (no bias).
  package var maxAbsScore: Double
  /// `A`: scale·max Σ_c |q_c·k_c| over every (query, key) pair, key/value head `h / G`.
  package var maxAbsProduct: Double
  /// `B`: the largest |finite bias|, 0 without a bias.
  package var maxAbsBias: Double
  package var maxAbsValue: Double
  package var expected: Expected

  package enum CodingKeys: String, CodingKey {
    case name, description, group, q, k, v, heads, masks, causal, alignment, window, scale, half
    case expected
    case kvHeads = "kv_heads"
    case groupSize = "group_size"
    case scaleUsed = "scale_used"
    case fullyMaskedRows = "fully_masked_rows"
    case maxAbsScore = "max_abs_score"
    case maxAbsProduct = "max_abs_product"
    case maxAbsBias = "max_abs_bias"
    case maxAbsValue = "max_abs_value"
  }

  /// The flat key/value batch that flat query batch `b` (`b = batch·H + h`) reads:
  /// `batch·Hkv + h / G`. Written out here, independently of `AttentionShape.keyValueBatch`.
  package func keyValueBatch(_ b: Int) -> Int {
    (b / heads) * kvHeads + (b % heads) / groupSize
  }

  package func causalAlignment() throws -> CausalAlignment {
    try CausalAlignment(fixture: alignment, case: name)
  }
}

/// A case with its arrays loaded and its `AttentionMask` built.
package struct LoadedSDPACase {
  package var spec: SDPACase
  package var queries: Tensor
  package var keys: Tensor
  package var values: Tensor
  package var mask: AttentionMask
  /// float64, `[B, H, Tq, Dv]` and `[B, H, Tq, Tk]` flattened.
  package var expectedOutput: [Double]
  package var expectedWeights: [Double]

  package init(_ spec: SDPACase) throws {
    self.spec = spec
    queries = try SDPAFixtures.tensor(spec.q)
    keys = try SDPAFixtures.tensor(spec.k)
    values = try SDPAFixtures.tensor(spec.v)
    mask = try SDPAFixtures.attentionMask(
      case: spec.name, causal: spec.causal, alignment: spec.alignment, window: spec.window,
      masks: spec.masks)
    expectedOutput = try SDPAFixtures.doubles(spec.expected.output)
    expectedWeights = try SDPAFixtures.doubles(spec.expected.weights)
  }

  /// Whether flat row `row` (over `[B, H, Tq]`) of the reference has every weight zero.
  package func isZeroRow(_ row: Int) -> Bool {
    let tk = spec.keys
    return expectedWeights[(row * tk)..<(row * tk + tk)].allSatisfy { $0 == 0 }
  }

  /// `Σ_j w_j·|v_jc|` for output element `e` (flat over `[B, H, Tq, Dv]`), from the float64
  /// weights and the values of the key/value head the row reads.
  package func outputMagnitude(_ e: Int) -> Double {
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    let row = e / dv
    let channel = e % dv
    let kv = spec.keyValueBatch(row / tq)
    var sum = 0.0
    for j in 0..<tk {
      sum +=
        expectedWeights[row * tk + j] * Double(abs(values.scalars[(kv * tk + j) * dv + channel]))
    }
    return sum
  }
}

/// How far a float32 kernel may be from a case's float64 reference, element by element: the
/// derivation of `AttentionTolerance` (Tolerance.swift), with its numbers taken from the manifest
/// (computed by numpy with the grouped-query head mapping) and the output magnitude read from the
/// key/value head each row uses.
///
/// With `u = 2⁻²⁴`, `γₙ = n·u/(1 − n·u)`, `λ = Float.leastNormalMagnitude`, `A`, `S`, `B` as in
/// the manifest:
/// 1. scores: `δ = γ_{D+1}·A + 4u·(S + B)` (one sgemm of length `D`, the float32 scale, the bias
///    and the max subtraction);
/// 2. weights: `ρ·w_j + λ` with `ρ = 2δ·(1 + 2δ) + γ_{Tk+6}` (the softmax turns a score error `δ`
///    into a factor `e^{±2δ}`; the exponentials, a sum of `Tk` terms in any order — also split in
///    chunks and merged, as the tiled kernel does — the reciprocal and the product);
/// 3. output: `(ρ + γ_Tk)·Σ_j w_j·|v_jc| + Tk·λ·max|v|` (the sgemm of length `Tk`).
/// A dropped, duplicated or wrongly mapped key, a misplaced mask or a wrong scale moves weights by
/// 10⁻³ or more; these tolerances are about 10⁻⁶ to 10⁻⁴ relative for `Tk` from 7 to 4096.
package struct SDPATolerance {
  package let scoreError: Double
  package let weightRelative: Double
  package let outputRelative: Double
  private let loaded: LoadedSDPACase

  package init(_ c: LoadedSDPACase) {
    let spec = c.spec
    let u = Float32Rounding.unit
    let delta =
      Float32Rounding.gamma(spec.headDim + 1) * spec.maxAbsProduct
      + 4 * u * (spec.maxAbsScore + spec.maxAbsBias)
    scoreError = delta
    weightRelative = 2 * delta * (1 + 2 * delta) + Float32Rounding.gamma(spec.keys + 6)
    outputRelative = weightRelative + Float32Rounding.gamma(spec.keys)
    loaded = c
  }

  /// The tolerance of weight element `e` (flat over `[B, H, Tq, Tk]`).
  package func weight(_ e: Int) -> Double {
    weightRelative * loaded.expectedWeights[e] + Double(Float.leastNormalMagnitude)
  }

  /// The tolerance of output element `e` (flat over `[B, H, Tq, Dv]`).
  package func output(_ e: Int) -> Double {
    outputRelative * loaded.outputMagnitude(e)
      + Double(loaded.spec.keys) * Double(Float.leastNormalMagnitude) * loaded.spec.maxAbsValue
  }

  package var summary: String {
    let spec = loaded.spec
    return "A = \(sci(spec.maxAbsProduct)), S = \(sci(spec.maxAbsScore)), "
      + "B = \(sci(spec.maxAbsBias)), δ = \(sci(scoreError)), ρ = \(sci(weightRelative))"
  }
}
