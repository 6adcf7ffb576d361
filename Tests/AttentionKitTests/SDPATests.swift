import Foundation
import Testing
import _TestSupport

@testable import AttentionKit

/// Every kernel against the numpy references of `Scripts/fixtures/make_sdpa_fixtures.py`
/// (`Fixtures/sdpa_gqa`), which follow PyTorch's `F.scaled_dot_product_attention`:
/// grouped-query heads (`H / Hkv` ∈ {1, 4, 8}), top-left and bottom-right causal masks with
/// `Tq <, =, > Tk`, sliding windows smaller and larger than a tile, boolean (`keep`) and float
/// (`bias`, with −∞) masks and fully masked rows, a scale override, float16/bfloat16-rounded
/// inputs, and decoding (`Tq` 1, 2, 7 against 4096 keys). Then what the tiled kernel promises
/// beyond the values: identical decode results for any thread count with the keys split, `O(T·W)`
/// tiles under a window, and grouped K/V read in place.
///
/// Tolerances, two independent ones for each float32 kernel:
/// - `SDPATolerance` (Tests/_TestSupport/SDPAFixtures.swift): `AttentionTolerance`'s worst-case
///   derivation with the numbers numpy wrote in the manifest;
/// - `ReferenceAttention.row(batch:query:)`'s per-element float32 error bounds, applied to the
///   distance from numpy's value as `max(bound, λ)` (λ = `Float.leastNormalMagnitude`, so a masked
///   weight or a zero row must be exactly 0). numpy's float64 value is within ~10⁻¹⁵ relative of
///   the exact one, far inside bounds that are at least `γ_{Tk+8}·w ≈ 10⁻⁶·w`.
/// The Double rows of `ReferenceAttention` themselves match numpy within 10⁻¹² relative.
@Suite("SDPA fixtures: grouped-query attention, alignments, windows, masks, half, decode")
struct SDPATests {
  /// The kernels under test.
  enum KernelChoice: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case reference, materialized, tiledSmall, tiledDefault

    var kernel: Attention.Kernel {
      switch self {
      case .reference: return .reference
      case .materialized: return .materialized
      case .tiledSmall: return .tiled(TiledAttention.Configuration(queryBlock: 8, keyBlock: 16))
      case .tiledDefault: return .tiled(.default)
      }
    }

    var returnsWeights: Bool { self == .reference || self == .materialized }

    var testDescription: String {
      switch self {
      case .tiledSmall: return "tiled 8×16"
      case .tiledDefault: return "tiled default"
      default: return rawValue
      }
    }
  }

  static func run(
    _ c: LoadedSDPACase, kernel: Attention.Kernel, threads: Int? = nil
  ) throws -> AttentionResult {
    try Attention.scaledDotProduct(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      scale: c.spec.scaleArgument, kernel: kernel, threads: threads)
  }

  static func reference(_ c: LoadedSDPACase) throws -> ReferenceAttention {
    try ReferenceAttention(
      queries: c.queries, keys: c.keys, values: c.values, mask: c.mask,
      scale: c.spec.scaleArgument)
  }

  // MARK: - The fixtures themselves

  @Test("The manifest's cases are consistent with their files", arguments: try SDPAFixtures.cases())
  func manifestConsistency(spec: SDPACase) throws {
    let c = try LoadedSDPACase(spec)
    let shape = try AttentionShape(queries: c.queries, keys: c.keys, values: c.values)
    #expect(spec.heads == spec.q.shape[1] && spec.kvHeads == spec.k.shape[1])
    #expect(spec.heads % spec.kvHeads == 0 && spec.groupSize == spec.heads / spec.kvHeads)
    #expect(shape.groupSize == spec.groupSize)
    for b in 0..<spec.batchCount {
      #expect(shape.keyValueBatch(b) == spec.keyValueBatch(b), "\(spec.name): flat batch \(b)")
    }
    // The reference used exactly the float32 scale the library uses.
    #expect(
      spec.scaleUsed == Double(shape.resolvedScale(spec.scaleArgument)),
      "\(spec.name): scale_used \(spec.scaleUsed)")
    #expect(spec.window == nil || spec.causal, "\(spec.name): a window is causal")
    #expect(c.expectedOutput.allSatisfy(\.isFinite) && c.expectedWeights.allSatisfy(\.isFinite))
    #expect(spec.maxAbsProduct >= spec.maxAbsScore * (1 - 1e-12), "\(spec.name): A < S")
    let zeroRows = (0..<(spec.batchCount * spec.queries)).filter(c.isZeroRow)
    #expect(zeroRows.count == spec.fullyMaskedRows, "\(spec.name): zero rows \(zeroRows)")
    for row in zeroRows {
      let dv = spec.valueDim
      #expect(c.expectedOutput[(row * dv)..<(row * dv + dv)].allSatisfy { $0 == 0 })
    }
  }

  @Test(
    "Half-precision inputs: the <f4 files hold exactly the float16 / bfloat16 values",
    arguments: try SDPAFixtures.cases(group: "half"))
  func halfPrecisionInputs(spec: SDPACase) throws {
    let half = try #require(spec.half)
    for (wide, narrow) in [(spec.q, half.q), (spec.k, half.k), (spec.v, half.v)] {
      let float32 = try SDPAFixtures.tensor(wide).scalars
      let stored = try SDPAFixtures.tensor(narrow).scalars
      #expect(stored.count == float32.count)
      switch half.format {
      case "float16":
        #expect(narrow.dtype == "<f2")
        // NPY widens binary16 exactly, so the two files hold the same numbers bit for bit.
        let same = zip(stored, float32).allSatisfy { $0.bitPattern == $1.bitPattern }
        #expect(same, "\(spec.name) \(wide.file): <f2 and <f4 values differ")
      case "bfloat16":
        #expect(narrow.dtype == "<u2")
        // A bfloat16 is the top half of a float32: the bits, shifted, are the float32.
        let same = zip(stored, float32).allSatisfy { UInt32($0) << 16 == $1.bitPattern }
        #expect(same, "\(spec.name) \(wide.file): <u2 bits and <f4 values differ")
      default:
        Issue.record("\(spec.name): unknown half format \(half.format)")
      }
    }
  }

  // MARK: - Values

  /// `ReferenceAttention`'s rows are computed in Double from the same float32 inputs with the
  /// same float32 scale as numpy: the two differ only by float64 rounding, the scores by at most
  /// `(D + 2)·2⁻⁵³·A` (≤ 10⁻¹³ here, D ≤ 64 and A < 10), the weights by twice that plus the sums
  /// of ≤ 4096 terms (≤ 4096·2⁻⁵³ ≈ 5·10⁻¹³ in the worst case, ~10⁻¹⁵ in practice). 10⁻¹²
  /// relative (to `w_j` and to `Σ_j w_j·|v_jc|`) covers both.
  @Test("Reference rows (Double) match numpy within 1e-12", arguments: try SDPAFixtures.cases())
  func referenceRowsMatchNumpy(spec: SDPACase) throws {
    let c = try LoadedSDPACase(spec)
    let reference = try Self.reference(c)
    var weights: [Double] = []
    var output: [Double] = []
    for b in 0..<spec.batchCount {
      for i in 0..<spec.queries {
        let row = reference.row(batch: b, query: i)
        weights += row.weights
        output += row.output
      }
    }
    let relative = 1e-12
    expectClose(
      weights, c.expectedWeights, shape: spec.expected.weights.shape,
      tolerance: { relative * c.expectedWeights[$0] + 1e-300 }, "\(spec.name) reference weights")
    expectClose(
      output, c.expectedOutput, shape: spec.expected.output.shape,
      tolerance: { relative * c.outputMagnitude($0) + 1e-300 }, "\(spec.name) reference output")
  }

  @Test(
    "Every kernel matches numpy's float64 output and weights",
    arguments: try SDPAFixtures.cases(), KernelChoice.allCases)
  func kernelMatchesNumpy(spec: SDPACase, choice: KernelChoice) throws {
    let c = try LoadedSDPACase(spec)
    let result = try Self.run(c, kernel: choice.kernel)
    let label = "\(spec.name) \(choice.testDescription)"
    #expect(result.output.shape == spec.expected.output.shape)
    let finiteOutput = result.output.scalars.allSatisfy(\.isFinite)
    #expect(finiteOutput, "\(label): non-finite output")
    let weights = result.weights
    if choice.returnsWeights {
      let w = try #require(weights)
      #expect(w.shape == spec.expected.weights.shape)
      let finiteWeights = w.scalars.allSatisfy(\.isFinite)
      #expect(finiteWeights, "\(label): non-finite weights")
    } else {
      #expect(weights == nil, "\(label): the tiled kernel returns no weights")
    }

    if choice == .reference {
      // `compute()` rounds the Double rows (within 1e-12 of numpy, see above) to Float: at most
      // u relative more (1.01·u), and λ for values below float32's normal range.
      let u = Float32Rounding.unit
      let lambda = Double(Float.leastNormalMagnitude)
      expectClose(
        result.output.scalars, c.expectedOutput, shape: result.output.shape,
        tolerance: {
          1e-12 * c.outputMagnitude($0) + 1.01 * u * abs(c.expectedOutput[$0]) + lambda
        },
        "\(label) output")
      if let w = weights {
        expectClose(
          w.scalars, c.expectedWeights, shape: w.shape,
          tolerance: { (1e-12 + 1.01 * u) * c.expectedWeights[$0] + lambda }, "\(label) weights")
      }
    } else {
      let tolerance = SDPATolerance(c)
      expectClose(
        result.output.scalars, c.expectedOutput, shape: result.output.shape,
        tolerance: tolerance.output, "\(label) output [\(tolerance.summary)]")
      if let w = weights {
        expectClose(
          w.scalars, c.expectedWeights, shape: w.shape, tolerance: tolerance.weight,
          "\(label) weights [\(tolerance.summary)]")
      }
      try Self.expectWithinRowBounds(c, result, label: label)
    }

    // Fully masked rows: exactly zero, never NaN.
    let (tk, dv) = (spec.keys, spec.valueDim)
    for row in 0..<(spec.batchCount * spec.queries) where c.isZeroRow(row) {
      let o = result.output.scalars[(row * dv)..<(row * dv + dv)]
      #expect(o.allSatisfy { $0 == 0 }, "\(label): fully masked row \(row) output \(Array(o))")
      if let w = weights?.scalars[(row * tk)..<(row * tk + tk)] {
        #expect(w.allSatisfy { $0 == 0 }, "\(label): fully masked row \(row) weights")
      }
    }
  }

  /// The kernel's rows against numpy, each element within `max(bound, λ)` of
  /// `ReferenceAttention.row`'s float32 error bound for that row.
  static func expectWithinRowBounds(
    _ c: LoadedSDPACase, _ result: AttentionResult, label: String,
    sourceLocation: SourceLocation = #_sourceLocation
  ) throws {
    let spec = c.spec
    let (tq, tk, dv) = (spec.queries, spec.keys, spec.valueDim)
    let reference = try Self.reference(c)
    let lambda = Double(Float.leastNormalMagnitude)
    var worstOutput = (ratio: 0.0, index: 0, got: Float(0), expected: 0.0, bound: 0.0)
    var worstWeight = (ratio: 0.0, index: 0, got: Float(0), expected: 0.0, bound: 0.0)
    for b in 0..<spec.batchCount {
      for i in 0..<tq {
        let row = b * tq + i
        let bounds = reference.row(batch: b, query: i)
        for ch in 0..<dv {
          let e = row * dv + ch
          let got = result.output.scalars[e]
          let bound = max(bounds.outputBounds[ch], lambda)
          let ratio = abs(Double(got) - c.expectedOutput[e]) / bound
          if !(ratio <= worstOutput.ratio) {
            worstOutput = (ratio, e, got, c.expectedOutput[e], bound)
          }
        }
        guard let weights = result.weights else { continue }
        for j in 0..<tk {
          let e = row * tk + j
          let got = weights.scalars[e]
          let bound = max(bounds.weightBounds[j], lambda)
          let ratio = abs(Double(got) - c.expectedWeights[e]) / bound
          if !(ratio <= worstWeight.ratio) {
            worstWeight = (ratio, e, got, c.expectedWeights[e], bound)
          }
        }
      }
    }
    for (what, worst, shape) in [
      ("output", worstOutput, spec.expected.output.shape),
      ("weights", worstWeight, spec.expected.weights.shape),
    ] {
      #expect(
        worst.ratio <= 1,
        """
        \(label) \(what) vs row bounds: worst at \(Tensor.multiIndex(ofFlat: worst.index, shape: shape)) \
        expected \(worst.expected), got \(worst.got), bound \(sci(worst.bound)), \
        ratio \(worst.ratio)
        """, sourceLocation: sourceLocation)
    }
  }

  @Test(
    "Bottom-right causal with Tq > Tk: the first Tq − Tk rows are zero; top-left sees keys",
    arguments: KernelChoice.allCases)
  func alignmentWithMoreQueries(choice: KernelChoice) throws {
    for name in ["causal_tl_tq40_tk7", "causal_br_tq40_tk7"] {
      let c = try LoadedSDPACase(try SDPAFixtures.sdpaCase(named: name))
      let (tq, tk, dv) = (c.spec.queries, c.spec.keys, c.spec.valueDim)
      let result = try Self.run(c, kernel: choice.kernel)
      for b in 0..<c.spec.batchCount {
        for i in 0..<tq {
          let o = result.output.scalars[((b * tq + i) * dv)..<((b * tq + i + 1) * dv)]
          let bottomRight = c.mask.causalAlignment == .bottomRight
          if bottomRight && i < tq - tk {
            #expect(o.allSatisfy { $0 == 0 }, "\(name) \(choice): row \(i) sees no key")
          } else {
            #expect(o.contains { $0 != 0 }, "\(name) \(choice): row \(i) sees a key")
          }
        }
      }
    }
  }

  // MARK: - Decoding: the key split and thread counts

  /// With `Tq` ≤ 7 every row fits one query block, so there are at most `B·H = 8` row tasks
  /// (fewer when the kernel stacks the query heads of a key/value head into one block: then
  /// `B·Hkv = 2`), below `keySplitThreshold` = 16: the 4096 keys are cut into chunks of whole
  /// key blocks (960 keys, or fewer when fitted to the stacked rows), computed as separate tasks
  /// and merged in a fixed order.
  @Test(
    "Decode: the tiled kernel splits the keys and gives identical bits for 1, 2, 3, 4, 8 threads",
    arguments: try SDPAFixtures.cases(group: "decode"))
  func decodeThreads(spec: SDPACase) throws {
    let c = try LoadedSDPACase(spec)
    let configuration = TiledAttention.Configuration.default
    // The key block the kernel uses: the default's, fitted to D, Dv and the stacked rows.
    let keyBlock = TiledAttention.tile(
      queries: spec.queries, keys: spec.keys, headDim: spec.headDim, valueDim: spec.valueDim,
      batchCount: spec.batchCount, groupSize: spec.groupSize, configuration: configuration
    ).keys
    let keyBlocks = (spec.keys + keyBlock - 1) / keyBlock
    let queryBlocks = (spec.queries + configuration.queryBlock - 1) / configuration.queryBlock
    #expect(keyBlocks > 1 && queryBlocks == 1)
    let mostRowTasks = spec.batchCount * queryBlocks  // one per (batch, head, query block)
    let fewestRowTasks = spec.batch * spec.kvHeads * queryBlocks  // heads stacked by K/V head
    #expect(mostRowTasks < TiledAttention.keySplitThreshold)
    var first: [UInt32]? = nil
    var workspace: [Int: Int] = [:]
    for threads in [1, 2, 3, 4, 8] {
      let result = try Self.run(c, kernel: .tiled(configuration), threads: threads)
      let bits = result.output.scalars.map(\.bitPattern)
      if let first {
        #expect(bits == first, "\(spec.name): \(threads) threads differ from 1 thread")
      } else {
        first = bits
      }
      workspace[threads] = result.workspaceBytes
      // Bottom-right causal: the last query of every row task sees all Tk keys, so each row
      // task computes every key block once: tiles = rowTasks · keyBlocks, more than one per row
      // task.
      let tiles = try #require(result.tilesComputed)
      #expect(tiles % keyBlocks == 0, "\(spec.name), \(threads) threads: \(tiles) tiles")
      #expect(
        (fewestRowTasks...mostRowTasks).contains(tiles / keyBlocks),
        "\(spec.name), \(threads) threads: \(tiles) tiles for \(keyBlocks) key blocks")
      #expect(tiles > mostRowTasks, "\(spec.name): \(tiles) tiles, not more than one per row task")
    }
    // tilesComputed is the same with or without a key split (the same blocks, in one task or in
    // several); the workspace shows the split. It is `workers · perThread + partials` floats
    // (TiledAttention's documentation), `workers = min(threads, tasks)` with at least 8 tasks
    // here, so the 1- and 8-thread workspaces give `perThread`, and what is left at 1 thread is
    // the `[rows, Dv + 2]` partial results of the split tasks: not zero.
    let (one, eight) = (try #require(workspace[1]), try #require(workspace[8]))
    let perThread = (eight - one) / 7
    #expect(perThread > 0 && (eight - one) % 7 == 0, "workspace \(workspace)")
    let partials = one - perThread
    #expect(partials > 0, "\(spec.name): no partial results, so no key split (\(workspace))")
    for threads in [2, 3, 4] {
      #expect(workspace[threads] == partials + threads * perThread, "workspace \(workspace)")
    }
  }

  // MARK: - Windows: O(T·W) tiles

  @Test("A windowed tiled call visits O(T·W) tiles, a causal one O(T²)")
  func windowTileCount() throws {
    let (t, w, bq, bk) = (2048, 64, 64, 64)
    let q = try Tensor.randomNormal(shape: [1, 1, t, 16], seed: 11, stream: 1)
    let k = try Tensor.randomNormal(shape: [1, 1, t, 16], seed: 11, stream: 2)
    let v = try Tensor.randomNormal(shape: [1, 1, t, 16], seed: 11, stream: 3)
    let configuration = TiledAttention.Configuration(queryBlock: bq, keyBlock: bk)
    let windowMask = AttentionMask(window: w)
    let windowed = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: windowMask, kernel: .tiled(configuration))
    let causal = try Attention.scaledDotProduct(
      queries: q, keys: k, values: v, mask: .causal, kernel: .tiled(configuration))
    let windowTiles = try #require(windowed.tilesComputed)
    let causalTiles = try #require(causal.tilesComputed)
    // 32 query blocks; each sees the W = 64 keys before its rows and its own 64: at most
    // W/Bk + 2 key blocks (63 in all here), against Σ_b (b + 1) = 528 for causal.
    #expect(windowTiles <= (t / bq) * (w / bk + 2), "windowed: \(windowTiles) tiles")
    #expect(windowTiles >= t / bq, "windowed: \(windowTiles) tiles")
    #expect(causalTiles >= (t / bq) * (t / bk) / 2, "causal: \(causalTiles) tiles")
    // The skipped tiles were indeed invisible: sampled rows are within the reference's bounds.
    let reference = try ReferenceAttention(queries: q, keys: k, values: v, mask: windowMask)
    for i in [0, 1, 63, 64, 65, 127, 1000, 2047] {
      let row = reference.row(batch: 0, query: i)
      let ratio = row.outputErrorRatio(windowed.output.scalars[(i * 16)..<(i * 16 + 16)])
      #expect(ratio <= 1, "windowed row \(i): error/bound \(ratio)")
    }
  }

  // MARK: - Grouped-query attention reads K and V in place

  @Test("GQA does not copy K/V: the workspace does not depend on Hkv, D or Tk")
  func gqaWorkspace() throws {
    let full = try LoadedSDPACase(try SDPAFixtures.sdpaCase(named: "gqa_h8_kv8"))
    let multi = try LoadedSDPACase(try SDPAFixtures.sdpaCase(named: "gqa_h8_kv1"))
    #expect(full.spec.kvHeads == full.spec.heads && multi.spec.kvHeads == 1)
    #expect(full.spec.q.shape == multi.spec.q.shape && full.spec.keys == multi.spec.keys)
    let spec = full.spec
    // 8×16 blocks: Tq = 33 is 5 query blocks, the two calls are cut into the same tasks, and
    // the workspace (tiles, accumulators, row statistics) is the same: no K/V copy for Hkv = 1.
    let small = TiledAttention.Configuration(queryBlock: 8, keyBlock: 16)
    for threads in [1, 4] {
      let a = try Self.run(full, kernel: .tiled(small), threads: threads)
      let b = try Self.run(multi, kernel: .tiled(small), threads: threads)
      #expect(
        a.workspaceBytes == b.workspaceBytes,
        "8×16, \(threads) threads: Hkv = H \(a.workspaceBytes), Hkv = 1 \(b.workspaceBytes)")
      let formula = TiledAttention.workspaceBytes(
        queries: spec.queries, keys: spec.keys, headDim: spec.headDim, valueDim: spec.valueDim,
        batchCount: spec.batchCount, configuration: small, threads: threads)
      #expect(a.workspaceBytes == formula, "8×16, \(threads) threads")
    }
    // Any kernel's workspace: a copy of K would grow with Tk·D, a copy of K or V with Tk. With
    // B·Hkv = 16 row tasks or more there is no key split, and with Tk > 960 the default key
    // block is 960 whatever Tk, so a kernel that reads K and V in place has the same workspace
    // for Tk 1000 or 2000, and for D 16 or 64 differs only by the transposed query blocks
    // (`D·Bq` floats per thread, TiledAttention's documentation) — as the formula says.
    for choice in [KernelChoice.tiledSmall, .tiledDefault] {
      let configuration = choice == .tiledSmall ? small : TiledAttention.Configuration.default
      for kvHeads in [8, 1] {
        var sizes: [String: Int] = [:]
        for (d, tk) in [(16, 1000), (64, 1000), (16, 2000)] {
          let q = try Tensor.randomNormal(shape: [16, 8, 4, d], seed: 5, stream: 1)
          let k = try Tensor.randomNormal(shape: [16, kvHeads, tk, d], seed: 5, stream: 2)
          let v = try Tensor.randomNormal(shape: [16, kvHeads, tk, 8], seed: 5, stream: 3)
          let result = try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, kernel: choice.kernel, threads: 4)
          sizes["D \(d), Tk \(tk)"] = result.workspaceBytes
          let formula = TiledAttention.workspaceBytes(
            queries: 4, keys: tk, headDim: d, valueDim: 8, batchCount: 16 * 8,
            groupSize: 8 / kvHeads, configuration: configuration, threads: 4)
          #expect(result.workspaceBytes == formula, "\(choice), Hkv \(kvHeads), D \(d), Tk \(tk)")
        }
        #expect(
          sizes["D 16, Tk 1000"] == sizes["D 16, Tk 2000"],
          "\(choice), Hkv \(kvHeads): workspace varies with Tk \(sizes)")
      }
    }
    // The materialized kernel holds the [B, H, Tq, Tk] weights and nothing for K/V.
    let weightsBytes = spec.batchCount * spec.queries * spec.keys * MemoryLayout<Float>.stride
    for c in [full, multi] {
      let result = try Self.run(c, kernel: .materialized)
      #expect(
        result.workspaceBytes == weightsBytes,
        "\(c.spec.name): materialized workspace \(result.workspaceBytes) ≠ \(weightsBytes)")
    }
  }

  /// The reference and materialized kernels compute each row the same way whatever the heads,
  /// so grouped K/V must give the very bits of K/V repeated by hand. The tiled kernel may cut
  /// grouped heads into other blocks (stacking the heads of a key/value head), so its two results
  /// must agree within the case's tolerance (each is within it of numpy, see above).
  @Test(
    "GQA matches K/V heads repeated by hand",
    arguments: ["gqa_h8_kv2", "gqa_h8_kv1", "gqa_h8_kv2_causal_bias", "decode_tq7"],
    KernelChoice.allCases)
  func gqaEqualsRepeatedHeads(name: String, choice: KernelChoice) throws {
    let c = try LoadedSDPACase(try SDPAFixtures.sdpaCase(named: name))
    var repeated = c
    repeated.keys = try Self.repeatHeads(c.keys, times: c.spec.groupSize)
    repeated.values = try Self.repeatHeads(c.values, times: c.spec.groupSize)
    let a = try Self.run(c, kernel: choice.kernel)
    let b = try Self.run(repeated, kernel: choice.kernel)
    if choice.returnsWeights {
      #expect(
        a.output.scalars.map(\.bitPattern) == b.output.scalars.map(\.bitPattern),
        "\(name) \(choice): output differs from the repeated-heads call")
      #expect(a.weights == b.weights, "\(name) \(choice): weights differ")
    } else {
      let tolerance = SDPATolerance(c)
      expectClose(
        a.output.scalars, b.output.scalars.map { Double($0) }, shape: a.output.shape,
        tolerance: tolerance.output, "\(name) \(choice): grouped vs repeated heads")
    }
  }

  /// `np.repeat(x, times, axis=1)` for `[B, Hkv, T, C]`.
  static func repeatHeads(_ x: Tensor, times: Int) throws -> Tensor {
    let (batch, heads, rows, columns) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    let slab = rows * columns
    var scalars: [Float] = []
    scalars.reserveCapacity(x.scalars.count * times)
    for b in 0..<batch {
      for h in 0..<heads {
        let start = (b * heads + h) * slab
        for _ in 0..<times { scalars += x.scalars[start..<(start + slab)] }
      }
    }
    return try Tensor(shape: [batch, heads * times, rows, columns], scalars: scalars)
  }

  @Test(
    "GQA shapes: query heads not a multiple of the key/value heads are refused",
    arguments: [(6, 4), (8, 3), (2, 4), (5, 2)])
  func gqaShapeErrors(heads: Int, kvHeads: Int) throws {
    let q = try Tensor(shape: [2, heads, 5, 8], repeating: 0.5)
    let k = try Tensor(shape: [2, kvHeads, 7, 8], repeating: 0.25)
    let v = try Tensor(shape: [2, kvHeads, 7, 4], repeating: 1)
    func check(_ what: String, _ body: () throws -> Void) {
      do {
        try body()
        Issue.record("H \(heads), Hkv \(kvHeads), \(what): no error")
      } catch let error as AttentionError {
        guard case .shapeMismatch(let message) = error else {
          Issue.record("H \(heads), Hkv \(kvHeads), \(what): \(error), not a shape mismatch")
          return
        }
        #expect(message.contains("multiple"), "\(what): \(message)")
      } catch {
        Issue.record("H \(heads), Hkv \(kvHeads), \(what): \(error), not an AttentionError")
      }
    }
    for choice in KernelChoice.allCases {
      check(choice.testDescription) {
        _ = try Attention.scaledDotProduct(queries: q, keys: k, values: v, kernel: choice.kernel)
      }
    }
    check("automatic") { _ = try Attention.scaledDotProduct(queries: q, keys: k, values: v) }
    check("ReferenceAttention") { _ = try ReferenceAttention(queries: q, keys: k, values: v) }
  }
}
