import AttentionKit
import Foundation
import Testing
import _TestSupport

/// The fixtures of `Scripts/fixtures/make_score_terms_fixtures.py` (`Fixtures/score_terms`), read
/// through `ScoreTermsFixtures`: every case is consistent with its files and with the definitions
/// the manifest states — shapes, the terms' parameters, which pairs are masked, rows that sum to
/// at most 1 (with a sink, to 1 with the sink's share), outputs equal to the weights times V.
/// BLOOM's slopes and T5's buckets are the library's (`PositionBias`), which must give the
/// fixtures' exactly. No kernel runs here; `ScoreTermsTests` compares the kernels with the cases.
@Suite("Score-terms fixtures: soft-capping, ALiBi, T5 buckets, sinks")
struct ScoreTermsFixtureTests {
  @Test("Every case loads, its shapes and terms agree", arguments: try ScoreTermsFixtures.cases())
  func shapesAndTerms(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let (b, h, hkv) = (spec.batch, spec.heads, spec.kvHeads)
    let (tq, tk, d, dv) = (spec.queries, spec.keys, spec.headDim, spec.valueDim)
    #expect(c.queries.shape == [b, h, tq, d])
    #expect(c.keys.shape == [b, hkv, tk, d])
    #expect(c.values.shape == [b, hkv, tk, dv])
    #expect(h % hkv == 0 && spec.groupSize == h / hkv)
    #expect(c.expectedOutput.count == b * h * tq * dv)
    #expect(c.expectedWeights.count == b * h * tq * tk)
    #expect(c.expectedOutput.allSatisfy(\.isFinite) && c.expectedWeights.allSatisfy(\.isFinite))
    #expect(spec.window == nil || spec.causal, "\(spec.name): a window is causal")
    let offset = spec.causal && spec.alignment == "bottom-right" ? tk - tq : 0
    #expect(spec.queryPositionOffset == offset)
    #expect(c.causalAlignment.rawValue == spec.alignment && c.isCausal == spec.causal)

    // The scale: the float32 default 1/√D, or Float(scale).
    let scale = spec.scale.map { Float($0) } ?? 1 / Float(d).squareRoot()
    #expect(spec.scaleUsed == Double(scale) && c.scale == spec.scale.map { Float($0) })

    var terms: [String] = []
    if let softcap = c.softcap {
      terms.append("softcap")
      #expect(softcap > 0 && Double(softcap) == spec.softcap)
    }
    if let alibi = c.alibi {
      terms.append("alibi")
      #expect(alibi.slopes.count == h)
      if alibi.isBLOOM {
        #expect(
          alibi.slopes == PositionBias.bloomSlopes(heads: h), "\(spec.name): not BLOOM's slopes")
      }
    }
    if let t5 = c.t5, let t5Spec = spec.t5 {
      terms.append("t5")
      #expect(t5.table.shape == [t5Spec.numBuckets, h] && t5.numBuckets == t5Spec.numBuckets)
      #expect(t5.buckets.shape == [tq, tk])
      for i in 0..<tq {
        for j in 0..<tk {
          let bucket = PositionBias.t5Bucket(
            relativePosition: j - (i + offset), bidirectional: t5.bidirectional,
            buckets: t5.numBuckets, maxDistance: t5.maxDistance)
          #expect(
            t5.buckets.scalars[i * tk + j] == Float(bucket),
            "\(spec.name): bucket of query \(i), key \(j)")
        }
      }
    } else {
      #expect(c.t5 == nil && spec.t5 == nil)
    }
    if let sinks = c.sinks {
      terms.append("sinks")
      #expect(sinks.count == h && sinks.allSatisfy(\.isFinite))
      #expect(c.expectedSinkWeights?.count == b * h * tq)
    } else {
      #expect(c.expectedSinkWeights == nil)
    }
    #expect(terms == spec.terms, "\(spec.name): terms \(spec.terms), fields give \(terms)")
    for m in [c.keepMask, c.floatMask].compactMap({ $0 }) {
      #expect(Self.broadcasts(m.shape, to: [b, h, tq, tk]), "\(spec.name): mask \(m.shape)")
    }
  }

  /// Masked weights are exactly 0, the others positive; rows sum to at most 1 (with a sink, to 1
  /// with its share; a fully masked row to 0 with a zero share); the output is the weights
  /// times V.
  @Test(
    "Masked weights are 0, rows sum to ≤ 1, output = weights·V",
    arguments: try ScoreTermsFixtures.cases())
  func weightsAndOutputs(spec: ScoreTermsCase) throws {
    let c = try LoadedScoreTermsCase(spec)
    let (h, tq, tk, dv) = (spec.heads, spec.queries, spec.keys, spec.valueDim)
    let shape = [spec.batch, h, tq, tk]
    var deadRows = 0
    var zeroRows = 0
    for flat in 0..<spec.batchCount {
      let kv = spec.keyValueBatch(flat)
      for i in 0..<tq {
        let row = flat * tq + i
        let iAbs = i + spec.queryPositionOffset
        let weights = c.expectedWeights[(row * tk)..<(row * tk + tk)]
        var visible = 0
        for j in 0..<tk {
          let index = [flat / h, flat % h, i, j]
          var masked = spec.causal && j > iAbs
          if let w = spec.window, j <= iAbs - w { masked = true }
          if let keep = c.keepMask, Self.element(keep, at: index, of: shape) == 0 { masked = true }
          if let bias = c.floatMask, Self.element(bias, at: index, of: shape) == -.infinity {
            masked = true
          }
          let w = weights[row * tk + j]
          if masked {
            #expect(w == 0, "\(spec.name): masked weight [\(row), \(j)] = \(w)")
          } else {
            visible += 1
            #expect(w > 0, "\(spec.name): visible weight [\(row), \(j)] = \(w)")
          }
        }
        if visible == 0 { deadRows += 1 }
        if c.isZeroRow(row) { zeroRows += 1 }

        let sum = weights.reduce(0, +)
        #expect(sum <= 1 + 1e-12, "\(spec.name): row \(row) sums to \(sum)")
        if let sinkWeights = c.expectedSinkWeights {
          let share = sinkWeights[row]
          if visible == 0 {
            #expect(share == 0, "\(spec.name): fully masked row \(row) has sink weight \(share)")
          } else {
            #expect(abs(sum + share - 1) <= 1e-12, "\(spec.name): row \(row): \(sum) + \(share)")
            // A sink's share below 1e-15 (σ = −80, −10⁴) vanishes in the float64 sum.
            #expect(share < 1e-15 || sum < 1, "\(spec.name): row \(row) sums to \(sum)")
          }
        } else if visible > 0 {
          #expect(abs(sum - 1) <= 1e-12, "\(spec.name): row \(row) sums to \(sum)")
        }

        // out_i = Σ_j p_ij·v_j, with v read from key/value head h / G.
        for ch in 0..<dv {
          var sum = 0.0
          var magnitude = 0.0
          for j in 0..<tk {
            let term = weights[row * tk + j] * Double(c.values.scalars[(kv * tk + j) * dv + ch])
            sum += term
            magnitude += abs(term)
          }
          let out = c.expectedOutput[row * dv + ch]
          #expect(
            abs(out - sum) <= 1e-12 * magnitude, "\(spec.name): output [\(row), \(ch)] \(out)")
          if visible == 0 { #expect(out == 0) }
        }
      }
    }
    #expect(deadRows == spec.fullyMaskedRows && zeroRows == deadRows, "\(spec.name): dead rows")
  }

  @Test("The cases cover every term alone and the combinations")
  func coverage() throws {
    let cases = try ScoreTermsFixtures.cases()
    #expect(Set(cases.map(\.name)).count == cases.count)
    for term in ["softcap", "alibi", "t5", "sinks"] {
      #expect(cases.contains { $0.terms == [term] }, "no case with \(term) alone")
      #expect(try ScoreTermsFixtures.cases(withTerm: term).contains { $0.fullyMaskedRows > 0 })
    }
    #expect(cases.contains { $0.terms.count == 4 && $0.causal })
    #expect(cases.contains { $0.alibi?.bloom == true && $0.heads == 6 })
    #expect(cases.contains { $0.t5?.bidirectional == false && $0.queries != $0.keys })
    #expect(cases.contains { $0.sinks != nil && $0.queries == 1 })
    #expect(cases.contains { $0.softcap != nil && ($0.scale ?? 1) < 0 })
    #expect(cases.contains { !($0.t5?.float64LogDiffersAt.isEmpty ?? true) })
  }

  // MARK: - Helpers

  /// Whether `shape` broadcasts (numpy, right-aligned) to `target`.
  static func broadcasts(_ shape: [Int], to target: [Int]) -> Bool {
    shape.count <= target.count
      && zip(shape.reversed(), target.reversed()).allSatisfy { $0 == 1 || $0 == $1 }
  }

  /// The element of `tensor`, broadcast to `shape`, at `index` (one entry per dimension of
  /// `shape`).
  static func element(_ tensor: Tensor, at index: [Int], of shape: [Int]) -> Float {
    let lead = shape.count - tensor.shape.count
    var flat = 0
    for (axis, extent) in tensor.shape.enumerated() {
      flat = flat * extent + (extent == 1 ? 0 : index[lead + axis])
    }
    return tensor.scalars[flat]
  }
}
