import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

/// One kernel at one n.
struct ComplexityMeasurement {
  var timeMilliseconds: Double
  var gflops: Double
  var workspaceBytes: Int
  var footprintBytes: Int
  /// `nil` when the peak could not be reset (`/proc/self/clear_refs` not writable).
  var rssGrowthBytes: Int?
}

/// One sequence length: the notebook's theoretical figures and what each kernel measured.
struct ComplexityRow {
  var n: Int
  var measurements: [Attention.Kernel: ComplexityMeasurement] = [:]
  var skipped: [Attention.Kernel] = []

  var elements: Int { n * n }
  /// The float32 `n × n` matrix in MB of 1024² bytes, as the notebook computes it.
  var theoreticalMB: Double { Double(n * n * 4) / 1_048_576 }
}

/// Runs every (n, kernel) of a `ComplexityCommand`.
struct ComplexitySweep {
  let command: ComplexityCommand
  private let progress = Progress()

  init(command: ComplexityCommand) { self.command = command }

  func run() throws -> (rows: [ComplexityRow], notes: [String]) {
    var notes: [String] = []
    let canResetPeak = ProcessMemory.resetPeak()
    if !canResetPeak {
      let reason = ProcessMemory.resetPeakProblem() ?? "the write failed"
      notes.append(
        "peak RSS not measured: /proc/self/clear_refs is not writable (\(reason)); "
          + "rss_growth_bytes is null")
    }
    let threads = command.resolvedThreads
    let budget = command.memoryBudget
    defer { progress.clear() }

    var rows: [ComplexityRow] = []
    for n in command.sizes {
      var row = ComplexityRow(n: n)
      let d = command.headDim
      let float = MemoryLayout<Float>.stride
      // Q, K, V and the output, [1, n, d] each.
      let ioBytes = 4 * n * d * float
      if ioBytes > budget {
        notes.append(
          "n = \(n): every kernel skipped: Q, K, V and the output alone need "
            + "\(formatBytes(ioBytes)), over the memory budget of \(formatBytes(budget)) "
            + "(--max-memory)")
        row.skipped = command.kernel.list
        rows.append(row)
        continue
      }
      progress.show("n = \(n): generating Q, K, V…")
      let shape = [1, n, d]
      let seed = command.seed
      let q = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.queries)
      let k = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.keys)
      let v = try Tensor.randomNormal(shape: shape, seed: seed, stream: RandomStream.values)
      for name in command.kernel.list {
        let kernel = name
        if case .tiled(let configuration) = kernel {
          let workspace = TiledAttention.workspaceBytes(
            queries: n, keys: n, valueDim: d, batchCount: 1, configuration: configuration,
            threads: threads)
          if ioBytes + workspace > budget {
            notes.append(
              "n = \(n): tiled skipped: its call needs \(formatBytes(ioBytes + workspace)), over "
                + "the memory budget of \(formatBytes(budget)) (--max-memory)")
            row.skipped.append(name)
            continue
          }
        }
        let call = {
          try Attention.scaledDotProduct(
            queries: q, keys: k, values: v, kernel: kernel, threads: threads,
            memoryBudget: budget)
        }
        progress.show("n = \(n): \(name.flagName)…")
        do {
          row.measurements[name] = try measure(
            call, n: n, d: d, inputBytes: (q.count + k.count + v.count) * float,
            canResetPeak: canResetPeak)
        } catch AttentionError.memoryBudget where name == .materialized {
          notes.append(
            "n = \(n): materialized skipped: its \(n)×\(n) attention matrix needs "
              + "\(formatBytes(n * n * float)), over the memory budget of \(formatBytes(budget)) "
              + "(--max-memory)")
          row.skipped.append(name)
        }
      }
      rows.append(row)
    }
    return (rows, notes)
  }

  /// One warm-up run (which also gives the workspace and the peak-RSS growth), then `repeats`
  /// timed runs; the median time is reported.
  private func measure(
    _ call: () throws -> AttentionResult, n: Int, d: Int, inputBytes: Int, canResetPeak: Bool
  ) throws -> ComplexityMeasurement {
    // Freed memory of earlier runs goes back to the system first, so that this run's
    // allocations show as new resident pages instead of reusing the heap.
    ProcessMemory.releaseFreeMemory()
    let before = ProcessMemory.status()
    let reset = canResetPeak && ProcessMemory.resetPeak()
    let warmUp = try call()
    let after = ProcessMemory.status()
    var rssGrowth: Int? = nil
    if reset, let before, let after { rssGrowth = max(after.peak - before.resident, 0) }

    var seconds: [Double] = []
    for _ in 0..<command.repeats {
      // The result outlives the clock, so freeing it is not timed.
      seconds.append(try Stopwatch.measure(call).seconds)
    }
    let median = Stopwatch.median(seconds)
    let flops = 4 * Double(n) * Double(n) * Double(d)
    let outputBytes = warmUp.output.count * MemoryLayout<Float>.stride
    return ComplexityMeasurement(
      timeMilliseconds: median * 1000,
      gflops: median > 0 ? flops / median / 1e9 : 0,
      workspaceBytes: warmUp.workspaceBytes,
      footprintBytes: inputBytes + outputBytes + warmUp.workspaceBytes,
      rssGrowthBytes: rssGrowth)
  }
}

// MARK: - Fits

/// The power laws fitted to each kernel's measurements.
struct ComplexityFits {
  struct KernelFit {
    /// Median time in milliseconds against n.
    var time: PowerLawFit
    /// Footprint in bytes (Q, K, V + output + workspace) against n.
    var memory: PowerLawFit
    /// Workspace in bytes against n.
    var workspace: PowerLawFit
  }

  var byKernel: [Attention.Kernel: KernelFit] = [:]
  var notes: [String] = []

  init(rows: [ComplexityRow], kernels: [Attention.Kernel]) {
    for name in kernels {
      let measured = rows.compactMap { row in row.measurements[name].map { (row.n, $0) } }
      let n = measured.map { Double($0.0) }
      guard measured.count >= 2 else {
        notes.append(
          "no fit for \(name.flagName): measured at \(measured.count) size"
            + "\(measured.count == 1 ? "" : "s"), a fit needs at least 2")
        continue
      }
      do {
        byKernel[name] = KernelFit(
          time: try PowerLawFit.fit(x: n, y: measured.map { $0.1.timeMilliseconds }),
          memory: try PowerLawFit.fit(x: n, y: measured.map { Double($0.1.footprintBytes) }),
          workspace: try PowerLawFit.fit(x: n, y: measured.map { Double($0.1.workspaceBytes) }))
      } catch {
        notes.append("no fit for \(name.flagName): \(error)")
      }
    }
  }

  /// The footprint's local slope between the last two measured sizes of each kernel,
  /// `log(m₂/m₁)/log(n₂/n₁)`: where the fitted exponent is heading.
  func tailSlopes(rows: [ComplexityRow], kernels: [Attention.Kernel]) -> String? {
    let parts = kernels.compactMap { name -> String? in
      let measured = rows.compactMap { row in row.measurements[name].map { (row.n, $0) } }
      guard measured.count >= 2 else { return nil }
      let (n1, m1) = measured[measured.count - 2]
      let (n2, m2) = measured[measured.count - 1]
      let slope =
        log(Double(m2.footprintBytes) / Double(m1.footprintBytes)) / log(Double(n2) / Double(n1))
      return "\(name.flagName) \(ComplexityCommand.twoDecimals(slope)) (n = \(n1) → \(n2))"
    }
    guard !parts.isEmpty else { return nil }
    return "memory slope at the largest sizes: " + parts.joined(separator: "; ")
  }
}

// MARK: - JSON

/// `attn complexity --format json`.
struct ComplexityReport: Encodable {
  struct Settings: Encodable {
    var minLen, maxLen, dModel, repeats: Int
    var seed: UInt64
    var threads, memoryBudgetBytes: Int
    var kernels: [String]
  }

  struct Row: Encodable {
    var seqLen: Int
    var elements: Int
    var theoreticalMb: Double
    /// Absent for a kernel skipped at this n.
    var kernels: [String: KernelRow]
  }

  struct KernelRow: Encodable {
    var timeMs: Double
    var gflops: Double
    var workspaceBytes: Int
    var footprintBytes: Int
    var rssGrowthBytes: Int?

    init(_ m: ComplexityMeasurement) {
      timeMs = m.timeMilliseconds
      gflops = m.gflops
      workspaceBytes = m.workspaceBytes
      footprintBytes = m.footprintBytes
      rssGrowthBytes = m.rssGrowthBytes
    }

    enum CodingKeys: String, CodingKey {
      case timeMs, gflops, workspaceBytes, footprintBytes, rssGrowthBytes
    }

    // Written out so that an unmeasured RSS growth is an explicit null, not a missing key.
    func encode(to encoder: Encoder) throws {
      var container = encoder.container(keyedBy: CodingKeys.self)
      try container.encode(timeMs, forKey: .timeMs)
      try container.encode(gflops, forKey: .gflops)
      try container.encode(workspaceBytes, forKey: .workspaceBytes)
      try container.encode(footprintBytes, forKey: .footprintBytes)
      try container.encode(rssGrowthBytes, forKey: .rssGrowthBytes)
    }
  }

  struct Fit: Encodable {
    var timeExponent, timeCoefficientMs, timeR2: Double
    var memoryExponent, memoryR2: Double
    var workspaceExponent, workspaceR2: Double

    init(_ fit: ComplexityFits.KernelFit) {
      timeExponent = fit.time.exponent
      timeCoefficientMs = fit.time.coefficient
      timeR2 = fit.time.rSquared
      memoryExponent = fit.memory.exponent
      memoryR2 = fit.memory.rSquared
      workspaceExponent = fit.workspace.exponent
      workspaceR2 = fit.workspace.rSquared
    }
  }

  var settings: Settings
  var rows: [Row]
  var fit: [String: Fit]
  var notes: [String]
}
