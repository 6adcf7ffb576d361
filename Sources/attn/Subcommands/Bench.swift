import ArgumentParser
import AttentionKit
import Foundation

/// `attn bench`: the tiled kernel timed on the performance targets' shapes, beside OpenBLAS's own
/// speed on the kernel's tile products, measured in the same run with the same threads.
struct BenchCommand: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "bench",
    abstract: "Time the tiled kernel against OpenBLAS's ceiling on its own tile products.",
    discussion: """
      Without shape flags it runs the standard cases (attention, causal, dropout, relpos, \
      efficiency, long); with any of --batch, --heads, --seq-len, --relpos it runs that one case. \
      Each result is checked against the float64 reference kernel on sampled rows before it is timed, and a \
      kernel that disagrees is not reported. Times are medians of --repeats runs, interleaved \
      with the sgemm ceiling runs; quote ratios, not absolute times, on a shared machine.
      """
  )

  @Option(help: "Batch B (custom case).") var batch: Int?
  @Option(help: "Heads H (custom case).") var heads: Int?
  @Option(help: "Sequence length T (custom case).") var seqLen: Int?
  @Option(name: .customLong("d-k"), help: "Head dimension D (custom case; default 64).")
  var headDim: Int?
  @Option(help: "Dropout probability (custom case; default 0).") var p: Float?
  @Flag(help: "Causal mask.") var causal = false
  @Flag(help: "Custom case: the relative-position module (d_model = --d-k, one head).")
  var relpos = false
  @Option(name: .customLong("max-rel"), help: "Largest relative distance M with --relpos (default 32).")
  var maxDistance: Int?
  @Option(help: "Cases to run, comma-separated (attention, causal, dropout, relpos, efficiency, long).")
  var cases: String?
  @OptionGroup var execution: ExecutionOptions
  @Option(help: "Timed runs per case (the median is reported).") var repeats: Int = 5
  @Option(help: "Query block Bq of the tiled kernel.") var queryBlock: Int = TiledAttention.Configuration.default.queryBlock
  @Option(help: "Key block Bk of the tiled kernel.") var keyBlock: Int = TiledAttention.Configuration.default.keyBlock
  @Option(help: "Seed for the inputs and dropout.") var seed: UInt64 = 42
  @Option(help: "Output format: text or json.") var format: OutputFormat = .text

  /// Any shape flag makes one custom case instead of the standard ones.
  private var isCustom: Bool {
    batch != nil || heads != nil || seqLen != nil || headDim != nil || p != nil || causal || relpos
  }

  func validate() throws {
    for (name, value) in [("--batch", batch), ("--heads", heads), ("--seq-len", seqLen)] {
      if let value, value < 1 { throw ValidationError("\(name) must be positive, got \(value)") }
    }
    if let headDim, headDim < 1 { throw ValidationError("--d-k must be positive, got \(headDim)") }
    if let maxDistance, !(0...(1 << 20)).contains(maxDistance) {
      throw ValidationError("--max-rel must be in 0...\(1 << 20), got \(maxDistance)")
    }
    if maxDistance != nil && !relpos { throw ValidationError("--max-rel goes with --relpos") }
    if relpos && (heads ?? 1) != 1 {
      throw ValidationError("--relpos runs the single-head module: leave --heads at 1")
    }
    if relpos && (p ?? 0) > 0 {
      throw ValidationError("--relpos runs the notebook's module, which has no dropout: drop --p")
    }
    if let p, !(p >= 0 && p < 1) { throw ValidationError("--p must be in [0, 1), got \(p)") }
    guard repeats > 0 else { throw ValidationError("--repeats must be positive, got \(repeats)") }
    guard queryBlock > 0, keyBlock > 0 else { throw ValidationError("block sizes must be positive") }
    if isCustom && cases != nil {
      throw ValidationError("--cases picks standard cases; shape flags make one custom case: not both")
    }
    if let cases {
      for name in cases.split(separator: ",") where BenchCase.standard[String(name)] == nil {
        throw ValidationError(
          "unknown case '\(name)'; choose from \(BenchCase.order.joined(separator: ", "))")
      }
    }
  }

  func run() throws {
    WarmAllocator.keepFreedMemory()
    let selected: [BenchCase]
    if isCustom {
      selected = [BenchCase(
        name: "custom", batch: batch ?? 1, heads: heads ?? 1, length: seqLen ?? 1024,
        headDim: headDim ?? 64, dropout: p ?? 0, causal: causal,
        maxDistance: relpos ? (maxDistance ?? 32) : nil)]
    } else {
      let names = cases.map { $0.split(separator: ",").map(String.init) } ?? BenchCase.order
      selected = names.compactMap { BenchCase.standard[$0] }
    }
    let configuration = TiledAttention.Configuration(queryBlock: queryBlock, keyBlock: keyBlock)
    let threadCount = execution.resolvedThreads
    for benchCase in selected {
      try benchCase.checkMemory(configuration: configuration, threads: threadCount)
    }
    var results: [BenchResult] = []
    if format == .text {
      print("OpenBLAS core \(BLAS.coreName), \(threadCount) threads, tiles Bq \(queryBlock) × Bk \(keyBlock)")
    }
    for benchCase in selected {
      if isatty(STDERR_FILENO) == 1 {
        FileHandle.standardError.write(Data("bench: \(benchCase.name) \(benchCase.shapeText)…\n".utf8))
      }
      let result = try benchCase.run(
        configuration: configuration, threads: threadCount, repeats: repeats, seed: seed)
      results.append(result)
      if format == .text { print(result.line) }
    }
    if format == .json {
      try printJSON(BenchReport(
        openblasCore: BLAS.coreName, threads: threadCount, queryBlock: queryBlock,
        keyBlock: keyBlock, cases: results))
    }
  }
}

/// One shape to time.
struct BenchCase {
  var name: String
  var batch: Int
  var heads: Int
  var length: Int
  var headDim: Int
  var dropout: Float = 0
  var causal = false
  /// `M`: run the relative-position module (projections, R = Q·Eᵀ, tiled attention) instead of
  /// bare attention, and time plain attention with the same projections beside it.
  var maxDistance: Int? = nil
  var repeats: Int? = nil

  static let order = ["attention", "causal", "dropout", "relpos", "efficiency", "long"]
  static let standard: [String: BenchCase] = [
    "attention": BenchCase(name: "attention", batch: 1, heads: 8, length: 2048, headDim: 64),
    "causal": BenchCase(name: "causal", batch: 1, heads: 8, length: 2048, headDim: 64, causal: true),
    "dropout": BenchCase(name: "dropout", batch: 4, heads: 8, length: 1024, headDim: 64, dropout: 0.1),
    "relpos": BenchCase(
      name: "relpos", batch: 1, heads: 1, length: 2048, headDim: 64, maxDistance: 32),
    "efficiency": BenchCase(name: "efficiency", batch: 1, heads: 8, length: 4096, headDim: 64),
    "long": BenchCase(name: "long", batch: 1, heads: 1, length: 65536, headDim: 64, repeats: 1),
  ]

  var shapeText: String {
    "B \(batch) H \(heads) T \(length) D \(headDim)" + (causal ? " causal" : "")
      + (dropout > 0 ? " p \(dropout)" : "") + (maxDistance.map { " relpos M \($0)" } ?? "")
  }

  /// Query–key pairs actually computed: all of them, or the lower triangle when causal.
  var pairs: Double {
    let t = Double(length)
    return Double(batch * heads) * (causal ? t * (t + 1) / 2 : t * t)
  }

  /// What one timed run computes, and how its rows are checked.
  private struct Workload {
    var reference: ReferenceAttention
    var run: () throws -> AttentionResult
    /// For relpos: plain attention on the same projections, timed beside it.
    var plain: (() throws -> AttentionResult)?
  }

  private func workload(
    configuration: TiledAttention.Configuration, threads: Int, seed: UInt64
  ) throws -> Workload {
    let mask: AttentionMask = causal ? .causal : .none
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    if let maxDistance {
      // The notebook's module: x [B, T, d] → Q, K, V projections → relative-position attention.
      let module = try RelativePositionAttention(
        modelDim: headDim, maxDistance: maxDistance, seed: seed)
      let x = try Tensor.randomNormal(
        shape: [batch, length, headDim], seed: seed, stream: RandomStream.input)
      let projected = try module.project(x)
      let reference = try ReferenceAttention(
        queries: projected.queries, keys: projected.keys, values: projected.values, mask: mask,
        scale: module.scale, relativePosition: module.positionBias)
      return Workload(
        reference: reference,
        run: {
          try module(x, mask: mask, kernel: .tiled(configuration), threads: threads).attention
        },
        plain: {
          let (q, k, v) = try module.project(x)
          return try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, mask: mask, scale: module.scale,
            kernel: .tiled(configuration), threads: threads)
        })
    }
    let shape = [batch, heads, length, headDim]
    let q = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
    return Workload(
      reference: try ReferenceAttention(queries: q, keys: k, values: v, mask: mask, dropout: drop),
      run: {
        try Attention.scaledDotProduct(
          queries: q, keys: k, values: v, mask: mask, dropout: drop,
          kernel: .tiled(configuration), threads: threads)
      },
      plain: nil)
  }

  func run(
    configuration: TiledAttention.Configuration, threads: Int, repeats: Int, seed: UInt64
  ) throws -> BenchResult {
    let memoryBefore = ProcessMemory.status()?.resident
    let peakReset = ProcessMemory.resetPeak()
    let work = try workload(configuration: configuration, threads: threads, seed: seed)

    // Check before timing: sampled rows against the float64 reference kernel.
    let first = try work.run()
    let reference = work.reference
    let rows = AttentionChecks.sampleRows(shape: reference.shape, seed: seed, limit: 16, count: 16)
    var worst = 0.0
    let dv = reference.shape.valueDim
    for (b, i) in rows {
      let offset = (b * reference.shape.queries + i) * dv
      worst = max(worst, reference.row(batch: b, query: i)
        .outputErrorRatio(first.output.scalars[offset..<(offset + dv)]))
    }
    guard worst <= 1 else {
      throw AttentionError.invalidArgument(
        "\(name): the tiled kernel disagrees with the reference kernel (error / bound \(worst)); "
          + "not reporting its time")
    }

    let ceiling = GemmCeiling(
      queryBlock: min(configuration.queryBlock, length), keyBlock: min(configuration.keyBlock, length),
      headDim: headDim, valueDim: headDim, threads: threads)
    let tiles = max(threads, Int(4 * pairs * Double(headDim) / ceiling.flopsPerTile))
    var times: [Double] = []
    var plainTimes: [Double] = []
    var ceilings: [Double] = []
    // Interleaved: kernel, plain attention (relpos only), sgemm ceiling, then again.
    for _ in 0..<(self.repeats ?? repeats) {
      times.append(try Stopwatch.measure(work.run).seconds)
      if let plain = work.plain { plainTimes.append(try Stopwatch.measure(plain).seconds) }
      ceilings.append(ceiling.measure(tiles: tiles))
    }
    let status = ProcessMemory.status()
    let median = Stopwatch.median(times)
    let gflops = 4 * pairs * Double(headDim) / median * 1e-9
    let sgemm = Stopwatch.median(ceilings)
    let plainMedian = plainTimes.isEmpty ? nil : Stopwatch.median(plainTimes)
    return BenchResult(
      name: name, batch: batch, heads: heads, seqLen: length, dK: headDim, p: Double(dropout),
      causal: causal, maxRel: maxDistance, medianMs: median * 1e3,
      minMs: (times.min() ?? .nan) * 1e3,
      gflops: gflops, sgemmGflops: sgemm, ratioToSgemm: gflops / sgemm,
      plainMedianMs: plainMedian.map { $0 * 1e3 },
      relposOverPlain: plainMedian.map { median / $0 },
      workspaceBytes: first.workspaceBytes,
      peakRssBytes: peakReset ? status?.peak : nil,
      rssBeforeBytes: memoryBefore, referenceErrorRatio: worst)
  }
}

/// One case's figures (`attn bench --format json`).
struct BenchResult: Encodable {
  var name: String
  var batch, heads, seqLen, dK: Int
  var p: Double
  var causal: Bool
  var maxRel: Int?
  var medianMs, minMs, gflops, sgemmGflops, ratioToSgemm: Double
  /// relpos: projections plus plain attention of the same shape, and our time over it.
  var plainMedianMs: Double?
  var relposOverPlain: Double?
  var workspaceBytes: Int
  /// The process's peak resident memory during this case (inputs included).
  var peakRssBytes: Int?
  var rssBeforeBytes: Int?
  var referenceErrorRatio: Double

  var line: String {
    let peak = peakRssBytes.map { formatBytes($0) } ?? "n/a"
    var label = name.padding(toLength: 10, withPad: " ", startingAt: 0)
    label += " B\(batch) H\(heads) T\(seqLen) D\(dK)"
    if causal { label += " causal" }
    if p > 0 { label += " p\(Float(p))" }
    if let maxRel { label += " M\(maxRel)" }
    var text = label.padding(toLength: 40, withPad: " ", startingAt: 0)
    text += String(
      format: "median %8.2f ms  min %8.2f ms  %6.1f GFLOP/s  sgemm %6.1f  ratio %4.2f",
      medianMs, minMs, gflops, sgemmGflops, ratioToSgemm)
    if let plainMedianMs, let relposOverPlain {
      text += String(format: "  plain %7.2f ms (relpos/plain %.2f)", plainMedianMs, relposOverPlain)
    }
    return text + "  workspace \(formatBytes(workspaceBytes))  peak RSS \(peak)"
  }
}

private struct BenchReport: Encodable {
  var openblasCore: String
  var threads: Int
  var queryBlock: Int
  var keyBlock: Int
  var cases: [BenchResult]
}
