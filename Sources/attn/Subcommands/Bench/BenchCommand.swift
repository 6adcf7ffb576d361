import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

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
  @Option(help: "Queries Tq when they differ from the keys (custom case; default --seq-len).")
  var tq: Int?
  @Option(help: "Keys Tk (custom case; same as --seq-len).") var tk: Int?
  @Option(help: "Key/value heads Hkv for grouped-query attention (custom case).")
  var kvHeads: Int?
  @Option(help: "Sliding window W, causal (custom case).") var window: Int?
  @Option(help: "Causal alignment: top-left or bottom-right (custom case).")
  var causalAlign: CausalAlignment?
  @Flag(help: "Custom case: the relative-position module (d_model = --d-k, one head).")
  var relpos = false
  @Option(
    name: .customLong("max-rel"), help: "Largest relative distance M with --relpos (default 32).")
  var maxDistance: Int?
  @Option(
    help: "Cases to run, comma-separated (attention, causal, dropout, relpos, efficiency, long).")
  var cases: String?
  @OptionGroup var execution: ExecutionOptions
  @Option(help: "Timed runs per case (the median is reported).") var repeats: Int = 5
  @Option(help: "Untimed runs per case before the timed ones (after the checking run).")
  var warmup: Int = 0
  @Option(
    help:
      "Query block Bq of the tiled kernel (default: fitted to each case, 16, or 256 for long sequences; with either block flag both blocks are as given)."
  )
  var queryBlock: Int?
  @Option(
    help:
      "Key block Bk of the tiled kernel (default: fitted to each case, up to 960 so that OpenBLAS runs the tile products unpacked, or 512 for long sequences)."
  )
  var keyBlock: Int?
  @Option(help: "Seed for the inputs and dropout.") var seed: UInt64 = 42
  @Flag(
    help: "Only probe whether the threads run in parallel now (FMA rate on 1 and N threads).")
  var probe = false
  @Option(
    help: ArgumentHelp(
      "Only time reading this .npy or safetensors file (--repeats reads; GB/s, peak RSS).",
      valueName: "path"))
  var read: String?
  @Flag(
    help:
      "Time the tiled backward pass beside the forward (attention, causal, dropout by default; with --cases also the score terms' cases, each beside plain attention)."
  )
  var backward = false
  @Option(help: "Decode cases' KV cache: float32, float16, bfloat16 or q8 (timed beside float32).")
  var kvDtype: KVStorage?
  @OptionGroup var report: ReportFormatOptions

  /// Any shape flag makes one custom case instead of the standard ones.
  private var isCustom: Bool {
    batch != nil || heads != nil || seqLen != nil || headDim != nil || p != nil || causal || relpos
      || tq != nil || tk != nil || kvHeads != nil || window != nil || causalAlign != nil
  }

  func validate() throws {
    for (name, value, limit) in [
      ("--batch", batch, FlagLimits.batch), ("--heads", heads, FlagLimits.heads),
      ("--kv-heads", kvHeads, FlagLimits.heads), ("--seq-len", seqLen, FlagLimits.sequenceLength),
      ("--tq", tq, FlagLimits.sequenceLength), ("--tk", tk, FlagLimits.sequenceLength),
      ("--window", window, FlagLimits.sequenceLength),
      ("--query-block", queryBlock, FlagLimits.sequenceLength),
      ("--key-block", keyBlock, FlagLimits.sequenceLength),
    ] {
      try FlagLimits.check(name, value, in: 1...limit)
    }
    if causalAlign != nil && !causal && window == nil {
      throw ValidationError(
        "--causal-align goes with --causal or --window (it says where the causal diagonal lies)")
    }
    if let seqLen, let tk, seqLen != tk {
      throw ValidationError("--seq-len \(seqLen) and --tk \(tk) differ; give one")
    }
    if let kvHeads, (heads ?? 1) % kvHeads != 0 {
      throw ValidationError("--heads \(heads ?? 1) must be a multiple of --kv-heads \(kvHeads)")
    }
    if relpos && (kvHeads != nil || window != nil || tq != nil) {
      throw ValidationError("--relpos runs the notebook's module: no --kv-heads, --window or --tq")
    }
    try FlagLimits.check("--d-k", headDim, in: 1...FlagLimits.dimension)
    try FlagLimits.check("--max-rel", maxDistance, in: 0...FlagLimits.maxDistance)
    if maxDistance != nil && !relpos { throw ValidationError("--max-rel goes with --relpos") }
    if relpos && (heads ?? 1) != 1 {
      throw ValidationError("--relpos runs the single-head module: leave --heads at 1")
    }
    if relpos && (p ?? 0) > 0 {
      throw ValidationError("--relpos runs the notebook's module, which has no dropout: drop --p")
    }
    if let p, !(p >= 0 && p < 1) { throw ValidationError("--p must be in [0, 1), got \(p)") }
    try FlagLimits.check("--repeats", repeats, in: 1...FlagLimits.repeats)
    try FlagLimits.check("--warmup", warmup, in: 0...FlagLimits.repeats)
    if isCustom && cases != nil {
      throw ValidationError(
        "--cases picks standard cases; shape flags make one custom case: not both")
    }
    if let cases {
      if cases.split(separator: ",").isEmpty {
        throw ValidationError(
          "--cases names no case; choose from \(BenchCase.order.joined(separator: ", "))")
      }
      for name in cases.split(separator: ",") where BenchCase.standard[String(name)] == nil {
        throw ValidationError(
          "unknown case '\(name)'; choose from \(BenchCase.order.joined(separator: ", "))")
      }
      if backward,
        let name = cases.split(separator: ",").first(where: {
          BenchCase.standard[String($0)]?.hasBackward == false
        })
      {
        throw ValidationError("--backward times bare attention; case '\(name)' has no backward")
      }
    }
    if backward && relpos {
      throw ValidationError("--backward times bare attention: not with --relpos")
    }
    if backward && (probe || read != nil) {
      throw ValidationError("--backward times the backward pass: not with --probe or --read")
    }
  }

  func run() throws {
    if let read {
      try timeReading(read)
      return
    }
    if probe {
      let result = CoreProbe.run(threads: execution.resolvedThreads)
      if report.format == .json { try printJSON(result) } else { print(result.line) }
      return
    }
    WarmAllocator.keepFreedMemory()
    var selected: [BenchCase]
    if isCustom {
      selected = [
        BenchCase(
          name: "custom", batch: batch ?? 1, heads: heads ?? 1, length: tk ?? seqLen ?? 1024,
          headDim: headDim ?? 64, dropout: p ?? 0,
          causal: causal || window != nil, queries: tq,
          keyValueHeads: kvHeads, window: window, alignment: causalAlign ?? .topLeft,
          maxDistance: relpos ? (maxDistance ?? 32) : nil)
      ]
    } else {
      let names =
        cases.map { $0.split(separator: ",").map(String.init) }
        ?? (backward ? BenchCase.backwardOrder : BenchCase.order)
      selected = names.compactMap { BenchCase.standard[$0] }
    }
    if let kvDtype {
      selected = selected.filter { $0.memoryBound && $0.term == nil && $0.maxDistance == nil }
      guard !selected.isEmpty, !backward, (p ?? 0) == 0 else {
        throw ValidationError(
          "--kv-dtype times decode-shaped cases (a few queries against a long cache, forward)")
      }
      for index in selected.indices { selected[index].kvStorage = kvDtype }
    }
    if backward {
      try runBackward(selected)
      return
    }
    try runForward(selected)
  }
}
