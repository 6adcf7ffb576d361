import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

@testable import attn

/// `attn bench`'s report: the statistics of the timed runs and the core probe. Nothing here is
/// timed against a threshold (tests never assert speed); only the report's consistency.
@Suite("attn bench (the executable)")
struct BenchCommandTests {
  /// `--kv-dtype`: a decode-shaped case checked on the stored keys and values and timed beside
  /// the float32 tensors; refused for a shape that is not decode-shaped.
  @Test("--kv-dtype times a compact KV cache beside float32, decode-shaped cases only")
  func kvDtype() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        [
          "bench", "--heads", "4", "--kv-heads", "2", "--tq", "1", "--tk", "1024", "--d-k", "32",
          "--causal", "--causal-align", "bottom-right", "--kv-dtype", "q8", "--repeats", "1",
          "--format", "json",
        ], in: folder)
      try #require(run.status == 0, "\(run.stderr)")
      let json = try #require(
        JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
      let first = try #require((json["cases"] as? [[String: Any]])?.first)
      #expect(first["kv_dtype"] as? String == "q8")
      let over = try #require(first["over_plain"] as? Double)
      #expect(over > 0 && over.isFinite)
      let refused = try AttnCLI.run(
        ["bench", "--heads", "2", "--seq-len", "128", "--kv-dtype", "float16"], in: folder)
      #expect(refused.status != 0)
      #expect(refused.stderr.contains("decode-shaped"), "\(refused.stderr)")
    }
  }

  /// The limits each run measures (#26): positive, finite figures in the JSON, and a
  /// memory-bound (decode-shaped) case's share of them.
  @Test("the JSON carries the machine's limits and each case's share of them")
  func limits() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        [
          "bench", "--heads", "2", "--tq", "1", "--tk", "2048", "--d-k", "16", "--repeats", "1",
          "--threads", "2", "--format", "json",
        ], in: folder)
      try #require(run.status == 0, "\(run.stderr)")
      let json = try #require(
        JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
      let limits = try #require(json["limits"] as? [String: Any])
      for key in ["peak_gflops", "bandwidth_gb_per_second"] {
        let value = try #require(limits[key] as? Double, "\(key)")
        #expect(value > 0 && value.isFinite, "\(key) = \(value)")
      }
      let first = try #require((json["cases"] as? [[String: Any]])?.first)
      for key in ["peak_fraction", "bandwidth_fraction", "gb_per_second"] {
        let value = try #require(first[key] as? Double, "\(key)")
        #expect(value > 0 && value.isFinite, "\(key) = \(value)")
      }
    }
  }

  /// Limits measured while the two vCPUs shared a core read low: the run keeps the highest of
  /// each, measured before every case.
  @Test("the run's limits are the highest measured, each limit on its own")
  func limitsKeepTheHighest() {
    let early = MachineLimits(peakGflops: 116, bandwidthGBPerSecond: 40, threads: 2)
    let later = MachineLimits(peakGflops: 229, bandwidthGBPerSecond: 30, threads: 2)
    for raised in [early.raised(to: later), later.raised(to: early)] {
      #expect(raised.peakGflops == 229 && raised.bandwidthGBPerSecond == 40)
    }
  }

  @Test("the JSON holds every timed run, and the statistics agree with them")
  func statistics() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        [
          "bench", "--heads", "2", "--seq-len", "128", "--d-k", "16", "--repeats", "4",
          "--warmup", "1", "--threads", "1", "--format", "json",
        ], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let report = try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any]
      let cases = try #require(report?["cases"] as? [[String: Any]])
      let figures = try #require(cases.first)
      let times = try #require(figures["times_ms"] as? [Double])
      let stats = try #require(figures["time_ms"] as? [String: Double])
      #expect(times.count == 4 && figures["warmup"] as? Int == 1)
      let mean = times.reduce(0, +) / 4
      #expect(abs((stats["mean"] ?? 0) - mean) <= 1e-9 * max(1, mean))
      #expect(stats["min"] == times.min() && stats["max"] == times.max())
      let sorted = times.sorted()
      #expect(abs((stats["median"] ?? 0) - (sorted[1] + sorted[2]) / 2) <= 1e-9 * max(1, mean))
      #expect((stats["standard_deviation"] ?? -1) >= 0)
      // The ceiling is measured on the kernel's own tile: Bq 16, Bk capped at T = 128 here.
      #expect(figures["tile_rows"] as? Int == 16 && figures["tile_keys"] as? Int == 128)
    }
  }

  @Test("--probe reports both rates and their ratio")
  func probe() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let run = try AttnCLI.run(
        ["bench", "--probe", "--threads", "2", "--format", "json"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let report = try #require(
        try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
      let single = try #require(report["single_gflops"] as? Double)
      let parallel = try #require(report["parallel_gflops"] as? Double)
      let scaling = try #require(report["scaling"] as? Double)
      #expect(single > 0 && parallel > 0 && report["threads"] as? Int == 2)
      #expect(abs(scaling - parallel / single) <= 1e-9 * scaling)
    }
  }

  @Test("--read times reading a file: its size, every read, a rate")
  func read() throws {
    try AttnCLI.withTemporaryFolder { folder in
      let path = folder.appendingPathComponent("x.npy")
      let bytes = NPY.encode(try Tensor(shape: [64, 64], repeating: 0.5))
      try Data(bytes).write(to: path)
      let run = try AttnCLI.run(
        ["bench", "--read", "x.npy", "--repeats", "3", "--format", "json"], in: folder)
      #expect(run.status == 0, "\(run.stderr)")
      let report = try #require(
        try JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
      #expect(report["bytes"] as? Int == bytes.count)
      #expect((report["times_ms"] as? [Double])?.count == 3)
      #expect((report["gb_per_second"] as? Double ?? 0) > 0)
      let bad = try AttnCLI.run(["bench", "--read", "missing.npy"], in: folder)
      #expect(bad.status == 1 && bad.stderr.contains("missing.npy"), "\(bad.stderr)")
    }
  }
}
