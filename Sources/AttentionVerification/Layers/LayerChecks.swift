import AttentionKit
import Foundation

/// The checks `attn mha` runs on a layer's result: sampled rows of the output (and of each
/// head's weights) against `MultiHeadReference`, the layer in float64 with a bound per value, and
/// with `--decode` the token-by-token outputs against the same reference and the full pass.
public struct LayerChecks {
  public let rows: [(batch: Int, token: Int)]
  public let expected: [MultiHeadReferenceRow]
  public let embedDim: Int
  public let heads: Int
  public let length: Int

  public init(reference: MultiHeadReference, rows: [(batch: Int, token: Int)]) {
    self.rows = rows
    expected = reference.rows(rows)
    embedDim = reference.layer.embedDim
    heads = reference.layer.heads
    length = reference.input.shape[1]
  }

  /// The worst `|value − reference| / bound` of `output` `[B, T, E]` over the sampled rows (a
  /// NaN where the reference has one counts as agreement).
  public func outputRatio(_ output: Tensor) -> Double {
    var worst = 0.0
    for ((b, t), row) in zip(rows, expected) {
      let base = (b * length + t) * embedDim
      for c in 0..<embedDim {
        worst = max(
          worst, Self.ratio(Double(output.scalars[base + c]), row.output[c], row.bound[c]))
      }
    }
    return worst
  }

  /// The worst ratio of `weights` `[B, H, T, Tk]` over the sampled rows, every head (`Tk = T`,
  /// or `T + 1` with an appended key).
  public func weightsRatio(_ weights: Tensor) -> Double {
    var worst = 0.0
    let keys = weights.shape.last ?? length
    for ((b, t), row) in zip(rows, expected) {
      for h in 0..<heads {
        let base = ((b * heads + h) * length + t) * keys
        for j in 0..<keys {
          worst = max(
            worst,
            Self.ratio(Double(weights.scalars[base + j]), row.weights[h][j], row.weightBounds[h][j])
          )
        }
      }
    }
    return worst
  }

  static func ratio(_ value: Double, _ expected: Double, _ bound: Double) -> Double {
    ErrorMeasurement.ratio(actual: value, expected: expected, bound: bound)
  }

  public func run(output: Tensor, weights: Tensor?, decoded: Tensor?) -> [Check] {
    var checks: [Check] = []
    let outputWorst = outputRatio(output)
    checks.append(
      Check(
        name: "matches_reference",
        title: "output rows match the float64 layer",
        passed: outputWorst <= 1,
        detail:
          "\(rows.count) rows × \(embedDim), worst error / bound = \(scientific(outputWorst))"
      ))
    if let weights {
      let worst = weightsRatio(weights)
      checks.append(
        Check(
          name: "weights_match_reference",
          title: "each head's weights match the float64 layer",
          passed: worst <= 1,
          detail:
            "\(rows.count) rows × \(heads) heads, worst error / bound = \(scientific(worst))"
        ))
    }
    if let decoded {
      let worst = outputRatio(decoded)
      checks.append(
        Check(
          name: "decode_matches_reference",
          title: "token-by-token outputs match the float64 layer",
          passed: worst <= 1,
          detail: "\(rows.count) rows, worst error / bound = \(scientific(worst))"))
      checks.append(decodeAgreement(decoded: decoded, full: output))
    }
    return checks
  }

  /// The token-by-token outputs of a decode through a float16, bfloat16 or q8 cache against this
  /// reference, which must be built on that cache's stored keys and values
  /// (`MultiHeadReference(…, storedKeys:storedValues:)`): the float32 error alone, within the
  /// same bounds as a float32 cache's. (Against the full pass they differ by the storage's own
  /// effect, which `KVCacheEffect` measures instead of bounding.)
  public func storedDecodeCheck(decoded: Tensor, storage: String) -> Check {
    let worst = outputRatio(decoded)
    return Check(
      name: "decode_matches_reference",
      title: "token-by-token outputs match the float64 layer on the \(storage) cache's stored "
        + "keys and values",
      passed: worst <= 1,
      detail: "\(rows.count) rows, worst error / bound = \(scientific(worst))")
  }

  /// Token by token against the full causal pass: on the sampled rows both lie within the bound
  /// of the reference, so they differ by at most twice it; the largest difference anywhere is
  /// reported beside it.
  private func decodeAgreement(decoded: Tensor, full: Tensor) -> Check {
    var worst = 0.0
    for ((b, t), row) in zip(rows, expected) {
      let base = (b * length + t) * embedDim
      for c in 0..<embedDim {
        worst = max(
          worst,
          Self.ratio(
            Double(decoded.scalars[base + c]), Double(full.scalars[base + c]), 2 * row.bound[c]))
      }
    }
    var largest: Float = 0
    var scale: Float = 0
    for (a, b) in zip(decoded.scalars, full.scalars) where a.isFinite && b.isFinite {
      largest = max(largest, abs(a - b))
      scale = max(scale, abs(b))
    }
    return Check(
      name: "decode_matches_full",
      title: "token by token equals the full causal pass",
      passed: worst <= 1,
      detail: "worst difference / (2 × bound) = \(scientific(worst)); largest "
        + "difference anywhere \(scientific(Double(largest))) (outputs up to \(scientific(Double(scale))))"
    )
  }
}

/// The same layer checked stage by stage, each stage from the float32 values that entered it —
/// the projections from `x`, the attention from the float32 Q, K, V (`ReferenceAttention`'s
/// bounds), the output projection from the float32 attention output — so that no stage's bound
/// carries the earlier stages' errors: tight where the end-to-end bound, compounded through the
/// projections, grows loose on inputs of large magnitude.
public struct LayerStageChecks {
  public let reference: MultiHeadReference
  public let rows: [(batch: Int, token: Int)]

  public init(reference: MultiHeadReference, rows: [(batch: Int, token: Int)]) {
    self.reference = reference
    self.rows = rows
  }

  public func run(
    heads: ProjectedHeads, mask: AttentionMask, attention: AttentionResult, output: Tensor
  ) throws -> [Check] {
    let layer = reference.layer
    let (h, hkv, d, e) = (layer.heads, layer.keyValueHeads, layer.headDim, layer.embedDim)
    let t = reference.input.shape[1]
    // The keys' rows: T, or T + 1 with an appended key (whose rows are parameters, not checked
    // in stage 1).
    let tk = heads.keys.shape[2]
    // 1. Q, K, V (rotated) against x·Wᵀ + b in float64.
    var projection = 0.0
    for (b, token) in rows {
      let expected = reference.projections(batch: b, token: token)
      for (tensor, count, want) in [
        (heads.queries, h, expected.queries), (heads.keys, hkv, expected.keys),
        (heads.values, hkv, expected.values),
      ] {
        let rowsPerHead = tensor.shape[2]
        for head in 0..<count {
          for c in 0..<d {
            let value = Double(tensor.scalars[((b * count + head) * rowsPerHead + token) * d + c])
            projection = max(
              projection,
              LayerChecks.ratio(value, want.value[head * d + c], want.bound[head * d + c]))
          }
        }
      }
    }
    // 2. The attention of the float32 Q, K, V, every head of the sampled rows.
    let attentionReference = try ReferenceAttention(
      queries: heads.queries, keys: heads.keys, values: heads.values, mask: mask,
      scale: layer.scale, terms: layer.terms)
    var kernel = 0.0
    for (b, token) in rows {
      for head in 0..<h {
        let flat = b * h + head
        let row = attentionReference.row(batch: flat, query: token)
        let o = (flat * t + token) * d
        kernel = max(kernel, row.outputErrorRatio(attention.output.scalars[o..<(o + d)]))
        if let weights = attention.weights {
          let w = (flat * t + token) * tk
          kernel = max(kernel, row.weightErrorRatio(weights.scalars[w..<(w + tk)]))
        }
      }
    }
    // 3. The output projection (and LayerNorm) of the float32 attention output.
    var last = 0.0
    for (b, token) in rows {
      var context = [Float](repeating: 0, count: h * d)
      for head in 0..<h {
        let o = ((b * h + head) * t + token) * d
        for c in 0..<d { context[head * d + c] = attention.output.scalars[o + c] }
      }
      let expected = reference.output(fromContext: context, batch: b, token: token)
      for c in 0..<e {
        last = max(
          last,
          LayerChecks.ratio(
            Double(output.scalars[(b * t + token) * e + c]), expected.value[c],
            expected.bound[c]))
      }
    }
    return [
      Check(
        name: "projections_match_reference",
        title: "stage 1: Q, K, V (rotated) equal x·Wᵀ + b in float64",
        passed: projection <= 1,
        detail: "\(rows.count) tokens, worst error / bound = \(scientific(projection))"),
      Check(
        name: "attention_matches_reference",
        title: "stage 2: each head's attention of those Q, K, V",
        passed: kernel <= 1,
        detail: "\(rows.count) rows × \(h) heads, worst error / bound = \(scientific(kernel))"),
      Check(
        name: "output_projection_matches_reference",
        title: "stage 3: the output projection of that attention",
        passed: last <= 1,
        detail: "\(rows.count) rows × \(e), worst error / bound = \(scientific(last))"),
    ]
  }
}

/// What a compact KV cache (float16, bfloat16, q8) costs: the decoded outputs against the full
/// pass on the float32 keys and values, every element — the storage's rounding or quantization
/// (plus float32 rounding, far smaller). Reported, not checked: how much is acceptable is the
/// user's call.
public struct KVCacheEffect: Encodable, Sendable {
  /// `max |decoded − full|` over the finite pairs.
  public var max: Double
  /// `√(mean (decoded − full)²)` over the finite pairs.
  public var rms: Double
  /// `√(mean full²)`, the scale to read the two against.
  public var outputRMS: Double

  public init(decoded: Tensor, full: Tensor) {
    var (largest, squares, outputSquares, count) = (0.0, 0.0, 0.0, 0)
    for (a, b) in zip(decoded.scalars, full.scalars) where a.isFinite && b.isFinite {
      let difference = Double(a) - Double(b)
      largest = Swift.max(largest, abs(difference))
      squares += difference * difference
      outputSquares += Double(b) * Double(b)
      count += 1
    }
    max = largest
    rms = count == 0 ? 0 : (squares / Double(count)).squareRoot()
    outputRMS = count == 0 ? 0 : (outputSquares / Double(count)).squareRoot()
  }
}
