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
      Without shape flags it runs the standard cases (attention, causal, dropout, efficiency, \
      long); with any of --batch, --heads, --seq-len it runs that one case. Each result is \
      checked against the float64 reference kernel on sampled rows before it is timed, and a \
      kernel that disagrees is not reported. Times are medians of --repeats runs, interleaved \
      with the sgemm ceiling runs; quote ratios, not absolute times, on a shared machine.
      """
  )

  @Option(help: "Batch B (custom case).") var batch: Int?
  @Option(help: "Heads H (custom case).") var heads: Int?
  @Option(help: "Sequence length T (custom case).") var seqLen: Int?
  @Option(help: "Head dimension D.") var dK: Int = 64
  @Option(help: "Dropout probability.") var p: Float = 0
  @Flag(help: "Causal mask.") var causal = false
  @Option(help: "Cases to run, comma-separated (attention, causal, dropout, efficiency, long).")
  var cases: String?
  @Option(help: "Threads (default: every core).") var threads: Int?
  @Option(help: "Timed runs per case (the median is reported).") var repeats: Int = 5
  @Option(help: "Query block Bq of the tiled kernel.") var queryBlock: Int = TiledAttention.Configuration.default.queryBlock
  @Option(help: "Key block Bk of the tiled kernel.") var keyBlock: Int = TiledAttention.Configuration.default.keyBlock
  @Option(help: "Seed for the inputs and dropout.") var seed: UInt64 = 42
  @Option(help: "Output format: text or json.") var format: OutputFormat = .text

  func validate() throws {
    for (name, value) in [("--batch", batch), ("--heads", heads), ("--seq-len", seqLen)] {
      if let value, value < 1 { throw ValidationError("\(name) must be positive, got \(value)") }
    }
    guard dK > 0 else { throw ValidationError("--d-k must be positive, got \(dK)") }
    guard p >= 0, p < 1 else { throw ValidationError("--p must be in [0, 1), got \(p)") }
    guard repeats > 0 else { throw ValidationError("--repeats must be positive, got \(repeats)") }
    if let threads, threads < 1 { throw ValidationError("--threads must be ≥ 1, got \(threads)") }
    guard queryBlock > 0, keyBlock > 0 else { throw ValidationError("block sizes must be positive") }
    if let cases {
      for name in cases.split(separator: ",") where BenchCase.standard[String(name)] == nil {
        throw ValidationError(
          "unknown case '\(name)'; choose from \(BenchCase.order.joined(separator: ", "))")
      }
    }
  }

  func run() throws {
    let selected: [BenchCase]
    if batch != nil || heads != nil || seqLen != nil {
      selected = [BenchCase(
        name: "custom", batch: batch ?? 1, heads: heads ?? 1, length: seqLen ?? 1024, headDim: dK,
        dropout: p, causal: causal)]
    } else {
      let names = cases.map { $0.split(separator: ",").map(String.init) } ?? BenchCase.order
      selected = names.compactMap { BenchCase.standard[$0] }
    }
    let configuration = TiledAttention.Configuration(
      queryBlock: queryBlock, keyBlock: keyBlock, threads: threads)
    let threadCount = threads ?? ProcessInfo.processInfo.activeProcessorCount
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
        openblas_core: BLAS.coreName, threads: threadCount, query_block: queryBlock,
        key_block: keyBlock, cases: results))
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
  var repeats: Int? = nil

  static let order = ["attention", "causal", "dropout", "efficiency", "long"]
  static let standard: [String: BenchCase] = [
    "attention": BenchCase(name: "attention", batch: 1, heads: 8, length: 2048, headDim: 64),
    "causal": BenchCase(name: "causal", batch: 1, heads: 8, length: 2048, headDim: 64, causal: true),
    "dropout": BenchCase(name: "dropout", batch: 4, heads: 8, length: 1024, headDim: 64, dropout: 0.1),
    "efficiency": BenchCase(name: "efficiency", batch: 1, heads: 8, length: 4096, headDim: 64),
    "long": BenchCase(name: "long", batch: 1, heads: 1, length: 65536, headDim: 64, repeats: 1),
  ]

  var shapeText: String {
    "B \(batch) H \(heads) T \(length) D \(headDim)" + (causal ? " causal" : "")
      + (dropout > 0 ? " p \(dropout)" : "")
  }

  /// Query–key pairs actually computed: all of them, or the lower triangle when causal.
  var pairs: Double {
    let t = Double(length)
    return Double(batch * heads) * (causal ? t * (t + 1) / 2 : t * t)
  }

  func run(
    configuration: TiledAttention.Configuration, threads: Int, repeats: Int, seed: UInt64
  ) throws -> BenchResult {
    let shape = [batch, heads, length, headDim]
    let q = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries)
    let k = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys)
    let v = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
    let mask: AttentionMask = causal ? .causal : .none
    let drop = dropout > 0 ? try Dropout(probability: dropout, seed: seed) : nil
    let memoryBefore = ProcessMemory.status()?.resident
    let peakReset = ProcessMemory.resetPeak()

    func kernel() throws -> AttentionResult {
      try TiledAttention.compute(
        queries: q, keys: k, values: v, mask: mask, dropout: drop, configuration: configuration)
    }
    // Check before timing: sampled rows against the float64 reference kernel.
    let first = try kernel()
    let reference = try ReferenceAttention(queries: q, keys: k, values: v, mask: mask, dropout: drop)
    let rows = AttentionChecks.sampleRows(shape: reference.shape, seed: seed, limit: 16, count: 16)
    var worst = 0.0
    let dv = reference.shape.valueDim
    for (b, i) in rows {
      let offset = (b * length + i) * dv
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
    var ceilings: [Double] = []
    for _ in 0..<(self.repeats ?? repeats) {
      times.append(try Stopwatch.time { _ = try kernel() })
      ceilings.append(ceiling.measure(tiles: tiles))
    }
    let status = ProcessMemory.status()
    let median = Stopwatch.median(times)
    let gflops = 4 * pairs * Double(headDim) / median * 1e-9
    let sgemm = Stopwatch.median(ceilings)
    return BenchResult(
      name: name, batch: batch, heads: heads, seq_len: length, d_k: headDim, p: Double(dropout),
      causal: causal, median_ms: median * 1e3, min_ms: (times.min() ?? .nan) * 1e3,
      gflops: gflops, sgemm_gflops: sgemm, ratio_to_sgemm: gflops / sgemm,
      workspace_bytes: first.workspaceBytes,
      peak_rss_bytes: peakReset ? status?.peak : nil,
      rss_before_bytes: memoryBefore, reference_error_ratio: worst)
  }
}

/// One case's figures (`attn bench --format json`).
struct BenchResult: Encodable {
  var name: String
  var batch, heads, seq_len, d_k: Int
  var p: Double
  var causal: Bool
  var median_ms, min_ms, gflops, sgemm_gflops, ratio_to_sgemm: Double
  var workspace_bytes: Int
  /// The process's peak resident memory during this case (inputs included).
  var peak_rss_bytes: Int?
  var rss_before_bytes: Int?
  var reference_error_ratio: Double

  var line: String {
    let peak = peak_rss_bytes.map { formatBytes($0) } ?? "n/a"
    return String(
      format: "%-10@ B%-2d H%-2d T%-6d D%-3d%@  median %9.2f ms  min %9.2f ms  %6.1f GFLOP/s  "
        + "sgemm %6.1f  ratio %4.2f  workspace %@  peak RSS %@",
      name, batch, heads, seq_len, d_k,
      (causal ? " causal" : "") + (p > 0 ? " p\(p)" : ""),
      median_ms, min_ms, gflops, sgemm_gflops, ratio_to_sgemm, formatBytes(workspace_bytes), peak)
  }
}

private struct BenchReport: Encodable {
  var openblas_core: String
  var threads: Int
  var query_block: Int
  var key_block: Int
  var cases: [BenchResult]
}
