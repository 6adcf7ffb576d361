import AttentionKit
import Foundation
import TensorIO
import Testing

/// The numpy references of `Scripts/fixtures/make_score_terms_fixtures.py` (its docstring is the
/// schema and the definitions), in `Fixtures/score_terms`: attention with score terms — logit
/// soft-capping, ALiBi, T5 relative-position buckets and attention sinks — alone and combined,
/// with grouped-query heads, both causal alignments, windows, masks and fully masked rows.
/// `Scripts/compare/check_score_terms_semantics.py` checks the definitions against transformers
/// and PyTorch.
///
/// For query head `h` (key/value head `h / G`), query `i`, key `j`, with
/// `i_abs = i + queryPositionOffset` (`Tk − Tq` when causal bottom-right, else 0):
/// `s = scale·q·k`; soft-cap `c`: `s = c·tanh(s/c)`; ALiBi: `s += slope_h·(j − i_abs)`;
/// T5: `s += table[bucket(j − i_abs), h]`; `s += bias`; masked (keep false, causal `j > i_abs`,
/// window `j ≤ i_abs − W`) → −∞; sinks: `m = max(σ_h, maxⱼ s)`,
/// `p = exp(s − m)/(exp(σ_h − m) + Σⱼ exp(sⱼ − m))`. A row with every key masked has zero
/// weights, zero sink weight and zero output.
///
/// Every case also has a backward reference: float64 gradients of `L = Σ output∘gradOut` (no
/// dropout), with `t = c·tanh(x/c)` (`x = scale·q·k`) or `t = x`, `Δᵢ = dOᵢ·Oᵢ`,
/// `dSᵢⱼ = pᵢⱼ(dOᵢ·vⱼ − Δᵢ)` (0 where masked), `dX = dS·(1 − (t/c)²)` with a soft-cap, else `dS`;
/// `dq = scale·dX·K`, `dk = scale·dXᵀ·Q`, `dv = pᵀ·dO` (dk and dv summed over the `G` query heads
/// of a key/value head), `dsinks_h = −Σ_(b,i) p_sink,i·Δᵢ`, `dt5Table[bucket, h] = Σ dS` over the
/// pairs with that bucket, `dbias = dS` summed to the bias's stored shape.
///
/// Shape legend: `B` batch, `H` query heads, `Hkv` key/value heads (`G = H / Hkv`), `Tq` queries,
/// `Tk` keys, `D` head dimension, `Dv` value dimension, `NB` T5 buckets. Q `[B, H, Tq, D]`,
/// K `[B, Hkv, Tk, D]`, V `[B, Hkv, Tk, Dv]`; references (`<f8`) `[B, H, Tq, Dv]`,
/// `[B, H, Tq, Tk]` and `[B, H, Tq]` (sink weights); gradients (`<f8`) dq `[B, H, Tq, D]`,
/// dk `[B, Hkv, Tk, D]`, dv `[B, Hkv, Tk, Dv]`, dsinks `[H]`, dt5Table `[NB, H]`, dbias the bias's
/// shape, ds `[B, H, Tq, Tk]`, from the upstream gradient (`<f4`) `[B, H, Tq, Dv]`.
package enum ScoreTermsFixtures: FixtureSet {
  /// `Tests/_TestSupport/Fixtures/score_terms`.
  package static let files = FixtureFolder<ScoreTermsManifest>(
    "score_terms", script: "Scripts/fixtures/make_score_terms_fixtures.py")

  /// The case called `name`.
  package static func scoreTermsCase(named name: String) throws -> ScoreTermsCase {
    try caseNamed(name)
  }

  /// Every case with its arrays loaded, in the manifest's order.
  package static func loadedCases() throws -> [LoadedScoreTermsCase] {
    try cases().map { try LoadedScoreTermsCase($0) }
  }

  /// The cases that use `term` (`"softcap"`, `"alibi"`, `"t5"`, `"sinks"`).
  package static func cases(withTerm term: String) throws -> [ScoreTermsCase] {
    let found = try cases().filter { $0.terms.contains(term) }
    guard !found.isEmpty else { throw FixtureError("no score-terms case with \(term)") }
    return found
  }
}

// MARK: - Manifest schema (see the script's docstring)

package typealias ScoreTermsManifest = CaseManifest<ScoreTermsCase>

package struct ScoreTermsCase: AttentionFixtureCase {
  /// The ALiBi slopes used (`<f4 [H]`), also when they are BLOOM's.
  package struct ALiBi: Decodable, Sendable {
    package var slopes: FileRef
    /// Whether the slopes are exactly BLOOM's rule for `H` heads (`build_alibi_tensor`).
    package var bloom: Bool
  }
  /// T5's relative-position bias: `table` `<f4 [NB, H]` (the layout of T5's
  /// `relative_attention_bias.weight`), `buckets` `<i8 [Tq, Tk]` = `bucket(j − i_abs)`.
  package struct T5: Decodable, Sendable {
    package var table: FileRef
    package var numBuckets: Int
    package var maxDistance: Int
    package var bidirectional: Bool
    package var buckets: FileRef
    /// The `j − i_abs` of the case where a float64 computation would give another bucket than
    /// transformers' float32 one.
    package var float64LogDiffersAt: [Int]

    package enum CodingKeys: String, CodingKey {
      case table, bidirectional, buckets
      case numBuckets = "num_buckets"
      case maxDistance = "max_distance"
      case float64LogDiffersAt = "float64_log_differs_at"
    }
  }
  package struct Expected: Decodable, Sendable {
    package var output: FileRef
    package var weights: FileRef
    /// `[B, H, Tq]`, the sink's share of each row's softmax; `nil` without sinks.
    package var sinkWeights: FileRef?

    package enum CodingKeys: String, CodingKey {
      case output, weights
      case sinkWeights = "sink_weights"
    }
  }
  /// The backward reference: the upstream gradient and the float64 gradients of
  /// `L = Σ output∘gradOut` (the script's docstring gives the formulas).
  package struct Gradients: Decodable, Sendable {
    /// `<f4 [B, H, Tq, Dv]`, the upstream gradient `dO` (an input, the case generator's last
    /// draw).
    package var gradOut: FileRef
    /// `<f8 [B, H, Tq, D]`.
    package var dq: FileRef
    /// `<f8 [B, Hkv, Tk, D]`, summed over the `G` query heads of each key/value head.
    package var dk: FileRef
    /// `<f8 [B, Hkv, Tk, Dv]`, summed over the `G` query heads of each key/value head.
    package var dv: FileRef
    /// `<f8 [H]`, summed over the batch and the rows; `nil` without sinks.
    package var dsinks: FileRef?
    /// `<f8 [NB, H]`, the layout of the table; `nil` without T5.
    package var dt5Table: FileRef?
    /// `<f8`, the float mask's own shape (summed over the axes it broadcasts along; 0 where it
    /// is −∞); `nil` without a float mask. The gradient of the score `s`, not of the uncapped
    /// product: the bias is added after the soft-cap.
    package var dbias: FileRef?
    /// `<f8 [B, H, Tq, Tk]`: dL/ds for the final score `s` (after the terms and the mask); 0
    /// where masked and on fully masked rows.
    package var ds: FileRef

    package enum CodingKeys: String, CodingKey {
      case dq, dk, dv, dsinks, dbias, ds
      case gradOut = "grad_out"
      case dt5Table = "dt5_table"
    }
  }

  package var name: String
  package var description: String
  /// Of `"softcap"`, `"alibi"`, `"t5"`, `"sinks"`, in that order.
  package var terms: [String]
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
  /// `i_abs − i`: `Tk − Tq` for a causal bottom-right case, else 0 (non-causal cases use
  /// `i_abs = i` whatever their alignment).
  package var queryPositionOffset: Int
  /// The requested scale; `nil` for the default `1/√D`.
  package var scale: Double?
  /// The float32 scale the reference used, widened to Double (negative in one case).
  package var scaleUsed: Double
  /// The soft-cap `c` (a float32 value), `nil` without soft-capping.
  package var softcap: Double?
  package var alibi: ALiBi?
  package var t5: T5?
  /// `<f4 [H]`, one logit per query head.
  package var sinks: FileRef?
  package var fullyMaskedRows: Int
  /// `A`: |scale|·max Σ_c |q_c·k_c| over every (query, key) pair, key/value head `h / G`.
  package var maxAbsProduct: Double
  /// `S`: max |scale·q·k| over the pairs that are not masked (before the soft-cap).
  package var maxAbsScore: Double
  /// max |ALiBi + T5 term| over the pairs that are not masked (0 without).
  package var maxAbsPositionTerm: Double
  /// The largest |finite bias|, 0 without a bias.
  package var maxAbsBias: Double
  /// max |σ|, 0 without sinks.
  package var maxAbsSink: Double
  package var maxAbsValue: Double
  package var expected: Expected
  package var gradients: Gradients

  package enum CodingKeys: String, CodingKey {
    case name, description, terms, q, k, v, heads, masks, causal, alignment, window, scale
    case softcap, alibi, t5, sinks, expected, gradients
    case kvHeads = "kv_heads"
    case groupSize = "group_size"
    case queryPositionOffset = "query_position_offset"
    case scaleUsed = "scale_used"
    case fullyMaskedRows = "fully_masked_rows"
    case maxAbsProduct = "max_abs_product"
    case maxAbsScore = "max_abs_score"
    case maxAbsPositionTerm = "max_abs_position_term"
    case maxAbsBias = "max_abs_bias"
    case maxAbsSink = "max_abs_sink"
    case maxAbsValue = "max_abs_value"
  }

  /// The flat key/value batch that flat query batch `b` (`b = batch·H + h`) reads:
  /// `batch·Hkv + h / G`.
  package func keyValueBatch(_ b: Int) -> Int {
    (b / heads) * kvHeads + (b % heads) / groupSize
  }
}

/// ALiBi's per-head slopes as used by the reference.
package struct ScoreTermsALiBi: Sendable {
  /// `[H]`, the slopes used (written to the fixture also when they come from BLOOM's rule).
  package var slopes: [Float]
  /// Whether `slopes` are exactly BLOOM's rule for `H` heads.
  package var isBLOOM: Bool
}

/// T5's relative-position bias as used by the reference.
package struct ScoreTermsT5: Sendable {
  /// `[NB, H]`: row `bucket`, column query head `h`.
  package var table: Tensor
  package var maxDistance: Int
  package var bidirectional: Bool
  /// `[Tq, Tk]`: `bucket(j − i_abs)` of every pair (masked ones too), as whole numbers.
  package var buckets: Tensor
  /// `NB`, the rows of `table`.
  package var numBuckets: Int { table.shape[0] }
}

/// A case with its arrays loaded and its `AttentionMask` built.
package struct LoadedScoreTermsCase: Sendable {
  package var spec: ScoreTermsCase
  package var queries: Tensor
  package var keys: Tensor
  package var values: Tensor
  /// Causality, alignment, window and the case's keep and bias masks.
  package var mask: AttentionMask
  /// The scale to pass: `nil` for the default `1/√D`, else `Float(scale)`.
  package var scale: Float?
  package var softcap: Float?
  package var alibi: ScoreTermsALiBi?
  package var t5: ScoreTermsT5?
  /// `[H]`, one logit per query head.
  package var sinks: [Float]?
  /// float64, `[B, H, Tq, Dv]` and `[B, H, Tq, Tk]` flattened.
  package var expectedOutput: [Double]
  package var expectedWeights: [Double]
  /// float64 `[B, H, Tq]` flattened: the sink's share of each row; `nil` without sinks.
  package var expectedSinkWeights: [Double]?
  /// `[B, H, Tq, Dv]`, the upstream gradient `dO` of the backward reference.
  package var gradOut: Tensor
  /// float64 `[B, H, Tq, D]` flattened: the gradient of `L = Σ output∘gradOut` for the queries.
  /// The gradients are kept at full float64 precision, like the other references; their shapes
  /// are in `spec.gradients`.
  package var expectedDQ: [Double]
  /// float64 `[B, Hkv, Tk, D]` flattened, summed over the query heads of each key/value head.
  package var expectedDK: [Double]
  /// float64 `[B, Hkv, Tk, Dv]` flattened, summed over the query heads of each key/value head.
  package var expectedDV: [Double]
  /// float64 `[H]`; `nil` without sinks.
  package var expectedDSinks: [Double]?
  /// float64 `[NB, H]` flattened; `nil` without T5.
  package var expectedDT5Table: [Double]?
  /// float64, the float mask's own shape, flattened; `nil` without a float mask.
  package var expectedDBias: [Double]?
  /// float64 `[B, H, Tq, Tk]` flattened: dL/ds of the final (masked) score.
  package var expectedDS: [Double]

  package init(_ spec: ScoreTermsCase) throws {
    self.spec = spec
    queries = try ScoreTermsFixtures.tensor(spec.q)
    keys = try ScoreTermsFixtures.tensor(spec.k)
    values = try ScoreTermsFixtures.tensor(spec.v)
    mask = try ScoreTermsFixtures.attentionMask(
      case: spec.name, causal: spec.causal, alignment: spec.alignment, window: spec.window,
      masks: spec.masks)
    scale = spec.scaleArgument
    softcap = spec.softcap.map { Float($0) }
    alibi = try spec.alibi.map {
      ScoreTermsALiBi(slopes: try ScoreTermsFixtures.tensor($0.slopes).scalars, isBLOOM: $0.bloom)
    }
    t5 = try spec.t5.map {
      ScoreTermsT5(
        table: try ScoreTermsFixtures.tensor($0.table), maxDistance: $0.maxDistance,
        bidirectional: $0.bidirectional, buckets: try ScoreTermsFixtures.tensor($0.buckets))
    }
    sinks = try spec.sinks.map { try ScoreTermsFixtures.tensor($0).scalars }
    expectedOutput = try ScoreTermsFixtures.doubles(spec.expected.output)
    expectedWeights = try ScoreTermsFixtures.doubles(spec.expected.weights)
    expectedSinkWeights = try spec.expected.sinkWeights.map { try ScoreTermsFixtures.doubles($0) }
    let gradients = spec.gradients
    gradOut = try ScoreTermsFixtures.tensor(gradients.gradOut)
    expectedDQ = try ScoreTermsFixtures.doubles(gradients.dq)
    expectedDK = try ScoreTermsFixtures.doubles(gradients.dk)
    expectedDV = try ScoreTermsFixtures.doubles(gradients.dv)
    expectedDSinks = try gradients.dsinks.map { try ScoreTermsFixtures.doubles($0) }
    expectedDT5Table = try gradients.dt5Table.map { try ScoreTermsFixtures.doubles($0) }
    expectedDBias = try gradients.dbias.map { try ScoreTermsFixtures.doubles($0) }
    expectedDS = try ScoreTermsFixtures.doubles(gradients.ds)
  }

  package var name: String { spec.name }

  /// The case's terms as the library takes them.
  package var scoreTerms: ScoreTerms {
    var terms = ScoreTerms(softcap: softcap, sinks: sinks)
    if let alibi { terms.positionBiases.append(.alibi(slopes: alibi.slopes)) }
    if let t5 {
      terms.positionBiases.append(
        .t5(table: t5.table, maxDistance: t5.maxDistance, bidirectional: t5.bidirectional))
    }
    return terms
  }
  package var isCausal: Bool { mask.isCausal }
  package var causalAlignment: CausalAlignment { mask.causalAlignment }
  package var window: Int? { mask.window }
  /// The boolean mask (`|b1` read as 0/1, 0 = masked), broadcastable to `[B, H, Tq, Tk]`.
  package var keepMask: Tensor? { mask.keep }
  /// The additive float mask (may hold −∞), broadcastable to `[B, H, Tq, Tk]`.
  package var floatMask: Tensor? { mask.bias }

  /// Whether flat row `row` (over `[B, H, Tq]`) of the reference has every weight zero.
  package func isZeroRow(_ row: Int) -> Bool {
    let tk = spec.keys
    return expectedWeights[(row * tk)..<(row * tk + tk)].allSatisfy { $0 == 0 }
  }
}
