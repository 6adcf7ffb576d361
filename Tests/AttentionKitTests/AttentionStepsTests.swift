import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// `AttentionSteps` and `RelativePositionSteps`: every intermediate matrix of one batch element.
///
/// Two kinds of claims, tested separately:
/// - the last steps ARE the kernel's results: the weights (before and after dropout) and the
///   output equal `MaterializedAttention`'s for the same batch element bit for bit, since the
///   steps run the kernel's own sgemm calls and row passes on the same inputs (an sgemm of the
///   same shape on the same data is deterministic; nothing here splits the sum differently);
/// - each step is what its name says: `Q·Kᵀ` and the scaled scores against a Double loop within
///   the float32 bound `γ_{D+1}·Σ|q·k|` (Higham §3.1, `γₙ = n·u/(1 − n·u)`, `u = 2⁻²⁴`), the
///   mask exactly where the mask says, softmax rows summing to 1, the dropout decisions equal to
///   `Dropout.keeps`, and the relative index equal to numpy's fixture.
@Suite("Attention steps")
struct AttentionStepsTests {
  /// A problem: shapes `[…, Tq, D]`, `[…, Tk, D]`, `[…, Tk, Dv]`, a mask, dropout, a scale.
  struct Case: Sendable, CustomTestStringConvertible {
    var name: String
    var batchShape: [Int]
    var tq: Int
    var tk: Int
    var d: Int
    var dv: Int
    var causal = false
    /// A keep mask `[Tq, Tk]` hiding key `(i + 1) % Tk` of every query and all of query 0.
    var keep = false
    /// A bias `[Tq, Tk]` of `0.1·(i − j)`.
    var bias = false
    var p: Float? = nil
    var scale: Float? = nil

    var testDescription: String { name }
    var batchCount: Int { batchShape.reduce(1, *) }

    func tensors() throws -> (q: Tensor, k: Tensor, v: Tensor) {
      (
        try Tensor.randomNormal(shape: batchShape + [tq, d], seed: 5, stream: 1),
        try Tensor.randomNormal(shape: batchShape + [tk, d], seed: 5, stream: 2),
        try Tensor.randomNormal(shape: batchShape + [tk, dv], seed: 5, stream: 3)
      )
    }

    func keepValue(_ i: Int, _ j: Int) -> Bool { !(keep && (i == 0 || j == (i + 1) % tk)) }
    func biasValue(_ i: Int, _ j: Int) -> Float { bias ? 0.1 * Float(i - j) : 0 }

    func mask() throws -> AttentionMask {
      var mask = AttentionMask(isCausal: causal)
      if keep {
        mask.keep = try Tensor(
          shape: [tq, tk],
          scalars: (0..<(tq * tk)).map { keepValue($0 / tk, $0 % tk) ? 1 : 0 })
      }
      if bias {
        mask.bias = try Tensor(
          shape: [tq, tk], scalars: (0..<(tq * tk)).map { biasValue($0 / tk, $0 % tk) })
      }
      return mask
    }

    func dropout() throws -> Dropout? { try p.map { try Dropout(probability: $0, seed: 42) } }
  }

  static let cases: [Case] = [
    Case(
      name: "the notebook's [1, 4, 8], dropout 0.1", batchShape: [1], tq: 4, tk: 4, d: 8,
      dv: 8, p: 0.1),
    Case(
      name: "[2, 3] heads, Tq ≠ Tk, causal, dropout 0.3", batchShape: [2, 3], tq: 5, tk: 7,
      d: 4, dv: 3, causal: true, p: 0.3),
    Case(
      name: "keep mask with a fully masked row, bias, scale 0.3, dropout 0.5",
      batchShape: [2], tq: 5, tk: 7, d: 6, dv: 5, keep: true, bias: true, p: 0.5,
      scale: 0.3),
    Case(
      name: "Tk = 70 (past 64 keys and the SIMD tail), dropout 0.2", batchShape: [1], tq: 3,
      tk: 70, d: 16, dv: 2, p: 0.2),
    Case(name: "eval, no mask", batchShape: [3], tq: 6, tk: 6, d: 3, dv: 4),
  ]

  // MARK: The last steps are the kernel's results

  @Test(
    "weights, weights after dropout and output equal the kernel's, bit for bit",
    arguments: cases)
  func lastStepsAreTheKernels(c: Case) throws {
    let (q, k, v) = try c.tensors()
    let mask = try c.mask()
    let dropout = try c.dropout()
    let kernel = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: mask, scale: c.scale, dropout: dropout,
      kernel: .materialized)
    let plain = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: mask, scale: c.scale, kernel: .materialized)
    let kernelWeights = try #require(kernel.weights)
    let plainWeights = try #require(plain.weights)
    let (size, outSize) = (c.tq * c.tk, c.tq * c.dv)
    for b in 0..<c.batchCount {
      let s = try AttentionSteps.compute(
        queries: q, keys: k, values: v, batch: b, mask: mask, scale: c.scale, dropout: dropout)
      #expect(s.batch == b)
      #expect(s.weights.shape == [c.tq, c.tk] && s.output.shape == [c.tq, c.dv])
      #expect(
        s.weightsAfterDropout.scalars
          == Array(kernelWeights.scalars[(b * size)..<((b + 1) * size)]),
        "batch \(b): weights after dropout differ from the kernel's")
      #expect(
        s.weights.scalars == Array(plainWeights.scalars[(b * size)..<((b + 1) * size)]),
        "batch \(b): softmax differs from the kernel's weights without dropout")
      #expect(
        s.output.scalars == Array(kernel.output.scalars[(b * outSize)..<((b + 1) * outSize)]),
        "batch \(b): output differs from the kernel's")
      #expect((s.keep == nil) == (dropout == nil))
    }
  }

  // MARK: Each step is what it says

  @Test("each step is what its name says", arguments: cases)
  func eachStep(c: Case) throws {
    let (q, k, v) = try c.tensors()
    let dropout = try c.dropout()
    let b = c.batchCount - 1  // the last batch element: offsets matter
    let s = try AttentionSteps.compute(
      queries: q, keys: k, values: v, batch: b, mask: try c.mask(), scale: c.scale,
      dropout: dropout)
    let scale = Double(s.scale)
    #expect(s.scale == (c.scale ?? 1 / Float(c.d).squareRoot()))

    // Steps 1–2 against Double: each is one sgemm of length D (the scale as its alpha).
    var dots = [Double](repeating: 0, count: c.tq * c.tk)
    var magnitudes = dots
    for i in 0..<c.tq {
      for j in 0..<c.tk {
        for e in 0..<c.d {
          let product =
            Double(q.scalars[(b * c.tq + i) * c.d + e])
            * Double(k.scalars[(b * c.tk + j) * c.d + e])
          dots[i * c.tk + j] += product
          magnitudes[i * c.tk + j] += abs(product)
        }
      }
    }
    let least = Double(Float.leastNormalMagnitude)
    expectClose(
      s.scores.scalars, dots, shape: [c.tq, c.tk],
      tolerance: { Float32Rounding.gamma(c.d) * magnitudes[$0] + least }, "\(c.name): Q·Kᵀ")
    expectClose(
      s.scaledScores.scalars, dots.map { $0 * scale }, shape: [c.tq, c.tk],
      tolerance: { Float32Rounding.gamma(c.d + 1) * scale * magnitudes[$0] + least },
      "\(c.name): Q·Kᵀ·scale")

    // Step 3: −∞ exactly where masked; elsewhere the scaled score plus the bias.
    for i in 0..<c.tq {
      for j in 0..<c.tk {
        let e = i * c.tk + j
        let masked = !c.keepValue(i, j) || (c.causal && j > i)
        let expected = masked ? -Float.infinity : s.scaledScores.scalars[e] + c.biasValue(i, j)
        #expect(s.maskedScores.scalars[e] == expected, "\(c.name): masked score (\(i), \(j))")
      }
    }

    // Step 4: rows sum to 1 (γ_{Tk+8}: the sum, the exponentials' own error, the division);
    // masked weights are exactly 0, and a fully masked row is all 0.
    for i in 0..<c.tq {
      let row = s.weights.scalars[(i * c.tk)..<((i + 1) * c.tk)]
      let sum = row.reduce(0.0) { $0 + Double($1) }
      let anyVisible = (0..<c.tk).contains { s.maskedScores.scalars[i * c.tk + $0] != -.infinity }
      let expected = anyVisible ? 1.0 : 0.0
      #expect(
        abs(sum - expected) <= Float32Rounding.gamma(c.tk + 8), "\(c.name): row \(i) sums to \(sum)"
      )
      for j in 0..<c.tk where s.maskedScores.scalars[i * c.tk + j] == -.infinity {
        #expect(row[row.startIndex + j] == 0, "\(c.name): masked weight (\(i), \(j))")
      }
    }

    // Step 5: the decisions are Dropout.keeps at the kernel's flat row; kept weights are
    // multiplied by 1/(1 − p) (the same float product as the kernel), dropped ones are 0.
    if let dropout, let keep = s.keep {
      var dropped = 0
      for i in 0..<c.tq {
        for j in 0..<c.tk {
          let e = i * c.tk + j
          let kept = dropout.keeps(row: b * c.tq + i, key: j)
          #expect(keep.scalars[e] == (kept ? 1 : 0), "\(c.name): decision (\(i), \(j))")
          let expected = kept ? s.weights.scalars[e] * dropout.keptScale : 0
          #expect(s.weightsAfterDropout.scalars[e] == expected, "\(c.name): (\(i), \(j))")
          if !kept { dropped += 1 }
        }
      }
      // Something must be dropped and something kept, or this case tests nothing.
      #expect(dropped > 0 && dropped < c.tq * c.tk, "\(c.name): \(dropped) dropped")
    } else {
      #expect(s.weightsAfterDropout == s.weights)
    }

    // Step 6: the output against weights·V in Double (γ_{Tk}·Σ|w·v|).
    var output = [Double](repeating: 0, count: c.tq * c.dv)
    var outputMagnitude = output
    for i in 0..<c.tq {
      for j in 0..<c.tk {
        let w = Double(s.weightsAfterDropout.scalars[i * c.tk + j])
        for e in 0..<c.dv {
          let term = w * Double(v.scalars[(b * c.tk + j) * c.dv + e])
          output[i * c.dv + e] += term
          outputMagnitude[i * c.dv + e] += abs(term)
        }
      }
    }
    expectClose(
      s.output.scalars, output, shape: [c.tq, c.dv],
      tolerance: { Float32Rounding.gamma(c.tk) * outputMagnitude[$0] + least },
      "\(c.name): weights·V")
  }

  @Test("a batch element out of range and a memory budget too small are errors")
  func errors() throws {
    let c = Self.cases[0]
    let (q, k, v) = try c.tensors()
    for batch in [-1, 1] {
      #expect(throws: AttentionError.self, "batch \(batch)") {
        try AttentionSteps.compute(queries: q, keys: k, values: v, batch: batch)
      }
    }
    // Five [4, 4] matrices and the [4, 8] output: 112 floats, 448 bytes without dropout.
    #expect(throws: AttentionError.self) {
      try AttentionSteps.compute(queries: q, keys: k, values: v, batch: 0, memoryBudget: 447)
    }
    _ = try AttentionSteps.compute(queries: q, keys: k, values: v, batch: 0, memoryBudget: 448)
  }

  // MARK: Relative positions

  @Test(
    "relpos: the steps are what they say; weights and output are the module's, bit for bit",
    arguments: try RelposCase.all())
  func relativePosition(spec: RelposCase) throws {
    let c = try LoadedRelposCase(spec)
    let (q, k, v) = try c.module.project(c.x)
    let kernel = try c.module.attention(queries: q, keys: k, values: v, mask: c.mask)
    let weights = try #require(kernel.weights)
    let positionScores = try c.module.positionScores(queries: q)
    let (t, d, m) = (spec.seqLen, spec.modelDim, spec.maxDistance)
    let index = try npyInt64s(
      ReferenceFixtures.path("relpos/relpos__\(spec.name)__relative_index.npy"))
    let embeddings = c.module.relativeEmbeddings.weight.scalars
    let least = Double(Float.leastNormalMagnitude)

    for b in 0..<spec.batch {
      let s = try c.module.steps(queries: q, keys: k, values: v, batch: b, mask: c.mask)
      let scale = Double(s.scale)
      #expect(s.maxDistance == m && s.positionTable.shape == [t, 2 * m + 1])
      // The index is numpy's (the notebook's code: clip(j − i, −M, M) + M).
      #expect(s.relativeIndex.scalars.map { Int64($0) } == index, "\(spec.name): index")
      #expect(
        s.weights.scalars == Array(weights.scalars[(b * t * t)..<((b + 1) * t * t)]),
        "\(spec.name) batch \(b): weights differ from the module's")
      #expect(
        s.output.scalars == Array(kernel.output.scalars[(b * t * d)..<((b + 1) * t * d)]),
        "\(spec.name) batch \(b): output differs from the module's")

      var content = [Double](repeating: 0, count: t * t)
      var position = content
      var magnitude = content
      for i in 0..<t {
        for j in 0..<t {
          let r = Int(index[i * t + j])
          // The gather reads R at the index, exactly.
          #expect(s.position.scalars[i * t + j] == s.positionTable.scalars[i * (2 * m + 1) + r])
          for e in 0..<d {
            let qe = Double(q.scalars[(b * t + i) * d + e])
            let ck = qe * Double(k.scalars[(b * t + j) * d + e])
            let pe = qe * Double(embeddings[r * d + e])
            content[i * t + j] += ck
            position[i * t + j] += pe
            magnitude[i * t + j] += abs(ck) + abs(pe)
          }
        }
      }
      // Each term is one sgemm of length D; the scores add two scaled ones (+ one rounding).
      expectClose(
        s.content.scalars, content, shape: [t, t],
        tolerance: { Float32Rounding.gamma(d) * magnitude[$0] + least }, "\(spec.name): Q·Kᵀ")
      expectClose(
        s.position.scalars, position, shape: [t, t],
        tolerance: { Float32Rounding.gamma(d) * magnitude[$0] + least }, "\(spec.name): q·E")
      expectClose(
        s.scores.scalars, zip(content, position).map { ($0 + $1) * scale }, shape: [t, t],
        tolerance: { Float32Rounding.gamma(d + 3) * scale * magnitude[$0] + least },
        "\(spec.name): (content + position)·scale")
      expectClose(
        positionScores.scalars[(b * t * t)..<((b + 1) * t * t)], position.map { $0 * scale },
        shape: [t, t],
        tolerance: { Float32Rounding.gamma(d + 1) * scale * magnitude[$0] + least },
        "\(spec.name): positionScores against the position step")
      // Masked exactly where the fixture's mask says.
      for i in 0..<t {
        for j in 0..<t {
          #expect(
            (s.maskedScores.scalars[i * t + j] == -.infinity) == !c.keeps(b, i, j),
            "\(spec.name) batch \(b): mask at (\(i), \(j))")
        }
      }
    }
  }
}

/// The elements of a little-endian `<i8` `.npy` file (which `NPY.read` does not take).
private func npyInt64s(_ path: String) throws -> [Int64] {
  let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
  let header = String(decoding: bytes.prefix(128), as: UTF8.self)
  guard bytes.count > 10, header.contains("'<i8'") else {
    throw FixtureError("\(path): not a little-endian int64 .npy")
  }
  let lengthSize = bytes[6] == 1 ? 2 : 4
  var headerLength = 0
  for i in 0..<lengthSize { headerLength |= Int(bytes[8 + i]) << (8 * i) }
  let start = 8 + lengthSize + headerLength
  return stride(from: start, to: bytes.count, by: 8).map { offset in
    var bits: UInt64 = 0
    for b in 0..<8 { bits |= UInt64(bytes[offset + b]) << (8 * b) }
    return Int64(bitPattern: bits)
  }
}
