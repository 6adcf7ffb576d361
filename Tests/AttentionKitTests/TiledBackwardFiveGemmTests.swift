import AttentionVerification
import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// The tiled backward's five-sgemm pass (every call without the bias gradient: `dQ` summed in
/// `C` chunk buffers, see `TiledBackward`) and the forward's results handed to the backward
/// (`AttentionResult.logSumExp`, `Attention.backward(…, output:logSumExp:)`): the same
/// gradients as the numpy fixtures and the reference within `GradientBounds`, bit-identical for
/// any thread count, bit-identical with and without the forward's results, and the forward's
/// log-sum-exp against a float64 computation.
@Suite("Tiled backward: five sgemms a tile, the forward's results")
struct TiledBackwardFiveGemmTests {
  typealias Choice = BackwardTests.KernelChoice

  static let tiledChoices: [Choice] = [.tiledSmall, .tiledDefault]

  /// The fixtures with a bias, without its gradient: the five-sgemm pass (the bias-gradient
  /// calls of `BackwardTests` take the two-pass scheme).
  @Test(
    "Without the bias gradient, tiled gradients match numpy and the reference",
    arguments: BackwardTests.fixtureCases, tiledChoices)
  func matchesWithoutBiasGradient(spec: BackwardCase, choice: Choice) throws {
    let c = try LoadedBackwardCase(spec)
    let problem = try BackwardTests.problem(c, needBiasGradient: false)
    for p in [0, 0.3] as [Float] {
      let dropout = try Dropout(probability: p, seed: 2024)
      let expanded = try ReferenceBackward.expand(problem, dropout: .counter(dropout))
      let r = expanded.evaluate()
      let bounds = GradientBounds(expanded, r, problem: problem, rounding: .float32)
      let g = try Attention.backward(
        queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOutput,
        mask: c.mask, scale: spec.scaleArgument, dropout: dropout, kernel: choice.kernel,
        threads: 2)
      #expect(g.kernel.isTiled && g.dBias == nil)
      BackwardTests.compare(
        g, dQ: r.dQ, dK: r.dK, dV: r.dV, dBias: nil, bounds: bounds, "\(spec.name) \(choice) p \(p)"
      )
    }
  }

  /// The `dQ` chunks of the synthetic shapes with 16 × 32 tiles: more than one, so that the
  /// thread test below sums chunk buffers.
  @Test("The synthetic shapes split dQ into several chunks")
  func severalChunks() throws {
    for s in BackwardTests.synthetic {
      let x = try BackwardTests.inputs(s)
      let shape = try AttentionShape(queries: x.q, keys: x.k, values: x.v)
      let partition = TiledBackward.Partition(
        queries: s.tq, keys: s.tk, headDim: shape.headDim, batchCount: shape.batchCount,
        groupSize: shape.groupSize, biasGradient: false,
        configuration: TiledAttention.Configuration(queryBlock: 16, keyBlock: 32))
      #expect(partition.dQChunks > 1, "\(s.name): C = \(partition.dQChunks)")
    }
  }

  @Test(
    "Without the bias gradient, tiled gradients are bit-identical for 1, 2 and 3 threads",
    arguments: BackwardTests.synthetic)
  func identicalAcrossThreads(s: BackwardTests.Synthetic) throws {
    let x = try BackwardTests.inputs(s)
    let dropout = try Dropout(probability: 0.3, seed: 99)
    for kernel in [
      Attention.Kernel.tiled(TiledAttention.Configuration(queryBlock: 16, keyBlock: 32)),
      .tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 8)), .automatic,
    ] {
      var results: [AttentionGradients] = []
      for threads in [1, 2, 3] {
        results.append(
          try Attention.backward(
            queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: x.mask,
            dropout: dropout, kernel: kernel, threads: threads))
      }
      for (threads, g) in zip([2, 3], results.dropFirst()) {
        let first = results[0]
        for (name, a, b) in [
          ("dQ", first.dQ, g.dQ), ("dK", first.dK, g.dK), ("dV", first.dV, g.dV),
        ] {
          let same = a.scalars.map(\.bitPattern) == b.scalars.map(\.bitPattern)
          #expect(same, "\(s.name) \(kernel): \(name) with \(threads) threads differs from 1")
        }
      }
    }
  }

  /// The backward given the forward's `output` and `logSumExp` (the forward run with the same
  /// blocks) computes the very floats of the backward that reruns the forward, with and without
  /// the bias gradient, with dropout.
  @Test(
    "The backward given the forward's results equals the one that reruns it, bit for bit",
    arguments: BackwardTests.synthetic)
  func givenForwardIsIdentical(s: BackwardTests.Synthetic) throws {
    let x = try BackwardTests.inputs(s)
    let dropout = try Dropout(probability: 0.3, seed: 7)
    for configuration in [
      TiledAttention.Configuration(queryBlock: 16, keyBlock: 32),
      TiledBackward.defaultConfiguration,
    ] {
      let forward = try Attention.scaledDotProduct(
        queries: x.q, keys: x.k, values: x.v, mask: x.mask, dropout: dropout,
        kernel: .tiled(configuration), threads: 2, needLogSumExp: true)
      let lse = try #require(forward.logSumExp)
      #expect(lse.shape == Array(x.q.shape.dropLast()))
      for needBiasGradient in [false, true] {
        let kernels: [Attention.Kernel] =
          configuration == TiledBackward.defaultConfiguration
          ? [.tiled(configuration), .automatic] : [.tiled(configuration)]
        for kernel in kernels {
          func run(given: Bool) throws -> AttentionGradients {
            try Attention.backward(
              queries: x.q, keys: x.k, values: x.v, gradOutput: x.dO, mask: x.mask,
              dropout: dropout, output: given ? forward.output : nil,
              logSumExp: given ? lse : nil, kernel: kernel, needBiasGradient: needBiasGradient,
              threads: 2)
          }
          let (rerun, given) = (try run(given: false), try run(given: true))
          var pairs = [
            ("dQ", rerun.dQ, given.dQ), ("dK", rerun.dK, given.dK), ("dV", rerun.dV, given.dV),
          ]
          if needBiasGradient { pairs.append(("dBias", rerun.dBias!, given.dBias!)) }
          for (name, a, b) in pairs {
            #expect(
              a.scalars.map(\.bitPattern) == b.scalars.map(\.bitPattern),
              "\(s.name) \(kernel) bias gradient \(needBiasGradient): \(name)")
          }
          // The forward's results are inputs, not workspace.
          #expect(given.workspaceBytes < rerun.workspaceBytes)
          #expect(given.tilesComputed == rerun.tilesComputed)
        }
      }
    }
  }

  /// With the forward's default blocks (256 × 512, not the backward's 256 × 256), the gradients
  /// differ from the rerun's only by rounding: both within the bounds against the reference.
  @Test("The backward given a forward with other blocks matches the reference")
  func givenForwardOtherBlocks() throws {
    for spec in BackwardTests.fixtureCases {
      let c = try LoadedBackwardCase(spec)
      let problem = try BackwardTests.problem(c)
      let dropout = try Dropout(probability: 0.3, seed: 5)
      let expanded = try ReferenceBackward.expand(problem, dropout: .counter(dropout))
      let r = expanded.evaluate()
      let bounds = GradientBounds(expanded, r, problem: problem, rounding: .float32)
      let forward = try Attention.scaledDotProduct(
        queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
        scale: spec.scaleArgument, dropout: dropout, threads: 2, needLogSumExp: true)
      let g = try Attention.backward(
        queries: c.queries, keys: c.keys, values: c.values, gradOutput: c.gradOutput,
        mask: c.mask, scale: spec.scaleArgument, dropout: dropout, output: forward.output,
        logSumExp: forward.logSumExp, needBiasGradient: c.mask.bias != nil, threads: 2)
      let dBias = c.mask.bias == nil ? nil : try BackwardTests.reducedBias(r.dS, problem: problem)
      BackwardTests.compare(
        g, dQ: r.dQ, dK: r.dK, dV: r.dV, dBias: dBias, bounds: bounds, "\(spec.name) given")
    }
  }

  /// `AttentionResult.logSumExp` against `log Σ_j exp(S_ij)` in float64 (scores through a keep
  /// mask and a causal mask, two rows fully masked: `−∞`), for blocks that split the keys of a
  /// decode step (merged partial results) and blocks that do not; `nil` unless asked for, and
  /// from the materialized kernel.
  @Test("The forward's log-sum-exp matches float64")
  func logSumExpMatchesFloat64() throws {
    for (tq, tk) in [(37, 53), (1, 300)] {
      let (h, d, dv) = (3, 8, 5)
      let q = try Tensor.randomNormal(shape: [2, h, tq, d], seed: 8, stream: 1)
      let k = try Tensor.randomNormal(shape: [2, h, tk, d], seed: 8, stream: 2)
      let v = try Tensor.randomNormal(shape: [2, h, tk, dv], seed: 8, stream: 3)
      var keep = try Tensor.randomUniform(shape: [2, 1, tq, tk], seed: 8, stream: 4)
      keep.scalars = keep.scalars.map { $0 < 0.25 ? 0 : 1 }
      let dead = tq > 1 ? [0, 5] : []
      for i in dead { for j in 0..<tk { keep[0, 0, i, j] = 0 } }
      let mask = AttentionMask(keep: keep, isCausal: true, causalAlignment: .bottomRight)
      let scale = 1 / Double(Float(d).squareRoot())
      for kernel in [
        Attention.Kernel.tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 16)),
        .automatic,
      ] {
        let result = try Attention.scaledDotProduct(
          queries: q, keys: k, values: v, mask: mask, kernel: kernel, threads: 2,
          needLogSumExp: true)
        let lse = try #require(result.logSumExp)
        #expect(lse.shape == [2, h, tq])
        for b in 0..<2 {
          for head in 0..<h {
            for i in 0..<tq {
              var scores: [Double] = []
              for j in 0..<tk where keep[b, 0, i, j] != 0 && j <= i + tk - tq {
                var dot = 0.0
                for c in 0..<d { dot += Double(q[b, head, i, c]) * Double(k[b, head, j, c]) }
                scores.append(dot * scale)
              }
              let observed = lse[b, head, i]
              guard let peak = scores.max() else {
                #expect(observed == -.infinity, "row \(b) \(head) \(i): \(observed)")
                continue
              }
              let expected = peak + log(scores.reduce(0) { $0 + exp($1 - peak) })
              #expect(
                abs(Double(observed) - expected) <= 1e-5 * (1 + abs(expected)),
                "\(kernel) row \(b) \(head) \(i): \(observed) vs \(expected)")
            }
          }
        }
        let plain = try Attention.scaledDotProduct(
          queries: q, keys: k, values: v, mask: mask, kernel: kernel, threads: 2)
        #expect(plain.logSumExp == nil)
        #expect(plain.output.scalars.map(\.bitPattern) == result.output.scalars.map(\.bitPattern))
      }
      let materialized = try Attention.scaledDotProduct(
        queries: q, keys: k, values: v, mask: mask, kernel: .materialized, threads: 2,
        needLogSumExp: true)
      #expect(materialized.logSumExp == nil)
    }
  }

  /// Fully masked rows give zero `dQ` rows through the chunk buffers too.
  @Test("Without the bias gradient, fully masked rows give zero dQ rows")
  func fullyMaskedRows() throws {
    let (tq, tk, d, dv) = (21, 40, 8, 8)
    let q = try Tensor.randomNormal(shape: [1, 2, tq, d], seed: 3, stream: 1)
    let k = try Tensor.randomNormal(shape: [1, 1, tk, d], seed: 3, stream: 2)
    let v = try Tensor.randomNormal(shape: [1, 1, tk, dv], seed: 3, stream: 3)
    let dO = try Tensor.randomNormal(shape: [1, 2, tq, dv], seed: 3, stream: 4)
    var keep = try Tensor(shape: [1, 1, tq, tk], repeating: 1)
    for i in [4, 17] { for j in 0..<tk { keep[0, 0, i, j] = 0 } }
    let g = try Attention.backward(
      queries: q, keys: k, values: v, gradOutput: dO, mask: .keep(keep),
      kernel: .tiled(TiledAttention.Configuration(queryBlock: 4, keyBlock: 8)), threads: 2)
    for flat in 0..<2 {
      for i in [4, 17] {
        let row = g.dQ.scalars[((flat * tq) + i) * d..<((flat * tq) + i + 1) * d]
        #expect(row.allSatisfy { $0 == 0 }, "dQ row \(i) of head \(flat): \(row)")
      }
    }
    #expect(g.dQ.scalars.contains { $0 != 0 })
  }

  /// The five-sgemm pass leaves the gradients unzeroed until it writes them: keys that no query
  /// sees (top-left causal with `Tq < Tk`) get exact zeros, query blocks whose rows see no key
  /// of chunk 0 get the other chunks' sum, and everything matches the materialized kernel.
  @Test("Without the bias gradient, every gradient element is written")
  func everyElementWritten() throws {
    let (tq, tk, d, dv) = (30, 50, 8, 6)
    for trial in 0..<3 {
      let seed = UInt64(30 + trial)
      let q = try Tensor.randomNormal(shape: [2, 2, tq, d], seed: seed, stream: 1)
      let k = try Tensor.randomNormal(shape: [2, 1, tk, d], seed: seed, stream: 2)
      let v = try Tensor.randomNormal(shape: [2, 1, tk, dv], seed: seed, stream: 3)
      let dO = try Tensor.randomNormal(shape: [2, 2, tq, dv], seed: seed, stream: 4)
      // Fill the allocator's free lists with NaN, so that a gradient element left unwritten
      // would likely show.
      for _ in 0..<4 { _ = try Tensor(shape: [4 * tk * d], repeating: .nan) }
      let masks = [AttentionMask.causal, AttentionMask(isCausal: true, window: 3)]
      for mask in masks {
        let g = try Attention.backward(
          queries: q, keys: k, values: v, gradOutput: dO, mask: mask,
          kernel: .tiled(TiledAttention.Configuration(queryBlock: 4, keyBlock: 8)), threads: 2)
        let m = try Attention.backward(
          queries: q, keys: k, values: v, gradOutput: dO, mask: mask, kernel: .materialized,
          threads: 2)
        for (name, a, b) in [("dQ", g.dQ, m.dQ), ("dK", g.dK, m.dK), ("dV", g.dV, m.dV)] {
          let worst = zip(a.scalars, b.scalars).map { abs($0 - $1) }.max() ?? 0
          #expect(worst <= 1e-4, "\(name) \(mask): off by \(worst)")
        }
        for g0 in 0..<2 {
          let unseen = g.dK.scalars[(g0 * tk + tq) * d..<(g0 + 1) * tk * d]
          #expect(unseen.allSatisfy { $0 == 0 }, "dK of unseen keys, \(mask)")
          let unseenV = g.dV.scalars[(g0 * tk + tq) * dv..<(g0 + 1) * tk * dv]
          #expect(unseenV.allSatisfy { $0 == 0 }, "dV of unseen keys, \(mask)")
        }
      }
    }
  }

  @Test("The forward's results are checked: both or neither, and their shapes")
  func errors() throws {
    let q = try Tensor.randomNormal(shape: [1, 2, 4, 8], seed: 1, stream: 1)
    let k = try Tensor.randomNormal(shape: [1, 2, 5, 8], seed: 1, stream: 2)
    let v = try Tensor.randomNormal(shape: [1, 2, 5, 3], seed: 1, stream: 3)
    let dO = try Tensor.randomNormal(shape: [1, 2, 4, 3], seed: 1, stream: 4)
    let forward = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, threads: 1, needLogSumExp: true)
    let lse = try #require(forward.logSumExp)
    for (output, logSumExp, word) in [
      (forward.output, nil, "together"), (nil, lse, "together"),
      (dO, try Tensor(shape: [1, 2, 5]), "logSumExp"), (q, lse, "output"),
    ] as [(Tensor?, Tensor?, String)] {
      do {
        _ = try Attention.backward(
          queries: q, keys: k, values: v, gradOutput: dO, output: output, logSumExp: logSumExp)
        Issue.record("no error for \(word)")
      } catch let error as AttentionError {
        #expect("\(error)".contains(word), "\(error)")
      }
    }
    let g = try Attention.backward(
      queries: q, keys: k, values: v, gradOutput: dO, output: forward.output, logSumExp: lse,
      kernel: .materialized)
    #expect(g.kernel == .materialized)
  }
}
