import AttentionKit
import Foundation
import Testing
import _TestSupport

@testable import attn

#if canImport(FoundationXML)
  import FoundationXML
#endif

/// `attn complexity`, run as the built executable: the JSON's structure and its exact figures
/// (theoretical sizes, workspaces), the fits, the memory-budget skips, CSV, the SVG plot (valid
/// XML with both panels, written atomically), and the exit codes of bad flags and paths.
/// Nothing here looks at a measured time: only at what is fixed by n, d and the kernels' layout.
@Suite("attn complexity", .serialized)
struct ComplexityTests {
  /// The tiled kernel's workspace at `n` tokens with the default blocks, D = Dv = 8, one thread,
  /// as the library states it (a [Bq, Bk] tile, a [Bq, Dv] accumulator, the row max and sum, the
  /// [D, Bq] transposed query block, and partial results when the keys are split; checked
  /// against its terms in TiledAttentionTests).
  static func tiledWorkspace(_ n: Int) -> Int {
    TiledAttention.workspaceBytes(queries: n, keys: n, valueDim: 8, batchCount: 1, threads: 1)
  }

  // MARK: JSON

  @Test("JSON: rows, theoretical figures, workspaces, footprints and fits")
  func json() throws {
    // --threads 1: the tiled kernel then has one worker at every n, so its workspace is
    // (Bq·Bk + Bq·Dv + 2·Bq + D·Bq)·4 bytes with Bq ≤ 16 and Bk ≤ 960 (the blocks shrink to fit
    // small n): never more than at n = 512, the longest here.
    let run = try runComplexityCLI([
      "complexity", "--min-len", "16", "--max-len", "512", "--d-model", "8", "--repeats", "1",
      "--threads", "1", "--format", "json",
    ])
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let report = try #require(
      JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
    let rows = try #require(report["rows"] as? [[String: Any]], "rows: \(report)")
    #expect(rows.compactMap { $0["seq_len"] as? Int } == [16, 32, 64, 128, 256, 512])

    var tiledWorkspaces: [Int: Int] = [:]
    for row in rows {
      let n = try #require(row["seq_len"] as? Int)
      #expect(row["elements"] as? Int == n * n, "elements at n = \(n)")
      #expect(
        row["theoretical_mb"] as? Double == Double(n * n * 4) / 1_048_576,
        "theoretical_mb at n = \(n): \(row["theoretical_mb"] ?? "missing")")
      let kernels = try #require(row["kernels"] as? [String: Any])
      #expect(Set(kernels.keys) == ["materialized", "tiled"], "kernels at n = \(n)")
      let io = 4 * n * 8 * 4  // Q, K, V and the output, [1, n, 8] float32 each
      for (name, value) in kernels {
        let k = try #require(value as? [String: Any])
        #expect(
          Set(k.keys) == [
            "time_ms", "gflops", "workspace_bytes", "footprint_bytes", "rss_growth_bytes",
          ], "\(name) keys at n = \(n): \(k.keys.sorted())")
        let time = try #require(k["time_ms"] as? Double)
        let gflops = try #require(k["gflops"] as? Double)
        #expect(time > 0 && gflops > 0)
        // GFLOP/s is 4·n²·d flops over the median time: consistent with time_ms.
        let expected = 4 * Double(n * n * 8) / (time / 1000) / 1e9
        #expect(abs(gflops / expected - 1) < 1e-9, "\(name) n = \(n): \(gflops) vs \(expected)")
        let workspace = try #require(k["workspace_bytes"] as? Int)
        #expect(k["footprint_bytes"] as? Int == io + workspace, "\(name) footprint at n = \(n)")
        // A number when /proc/self/clear_refs is writable, else an explicit null.
        #expect(k["rss_growth_bytes"] is Int || k["rss_growth_bytes"] is NSNull)
        if name == "materialized" {
          #expect(workspace == n * n * 4, "materialized workspace at n = \(n): \(workspace)")
        } else {
          tiledWorkspaces[n] = workspace
        }
      }
    }
    let sizes = tiledWorkspaces.keys.sorted()
    let workspaces = sizes.map { tiledWorkspaces[$0]! }
    #expect(workspaces == workspaces.sorted(), "tiled workspace shrinks with n: \(tiledWorkspaces)")
    #expect(tiledWorkspaces[512] == Self.tiledWorkspace(512), "\(tiledWorkspaces)")

    let fits = try #require(report["fit"] as? [String: Any])
    #expect(Set(fits.keys) == ["materialized", "tiled"])
    for (name, value) in fits {
      let fit = try #require(value as? [String: Any])
      for key in ["time_exponent", "memory_exponent", "time_r2", "memory_r2"] {
        let number = fit[key] as? Double
        #expect(number?.isFinite == true, "\(name).\(key) = \(fit[key] ?? "missing")")
      }
      if name == "materialized" {
        // The workspace is exactly 4·n² bytes, so its fit is exactly n², whatever the timings.
        let exponent = try #require(fit["workspace_exponent"] as? Double)
        #expect(abs(exponent - 2) < 1e-9, "materialized workspace exponent \(exponent)")
      }
      let r2 = try #require(fit["memory_r2"] as? Double)
      #expect(r2 <= 1 + 1e-12)
    }
    // Footprints are exact too: the materialized one grows faster than the tiled one.
    func memoryExponent(_ name: String) -> Double? {
      (fits[name] as? [String: Any])?["memory_exponent"] as? Double
    }
    let materialized = try #require(memoryExponent("materialized"))
    let tiled = try #require(memoryExponent("tiled"))
    #expect(materialized > tiled, "memory exponents: materialized \(materialized), tiled \(tiled)")
    #expect(report["notes"] is [Any])
  }

  @Test("a kernel over the memory budget is skipped, with a note; the tiled kernel goes on")
  func memoryBudget() throws {
    // 768K: the materialized matrix fits up to n = 256 (256 KiB) but not at 512 (1 MiB); the
    // tiled call (Q, K, V, output ≤ 128 KiB + 522 KiB of tiles) fits everywhere.
    let run = try runComplexityCLI([
      "complexity", "--min-len", "128", "--max-len", "1024", "--d-model", "8", "--repeats", "1",
      "--threads", "1", "--max-memory", "768K", "--format", "json",
    ])
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let report = try #require(
      JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
    let rows = try #require(report["rows"] as? [[String: Any]])
    var present: [Int: Set<String>] = [:]
    var tiledWorkspaces: [Int: Int] = [:]
    for row in rows {
      let n = try #require(row["seq_len"] as? Int)
      let kernels = row["kernels"] as? [String: Any] ?? [:]
      present[n] = Set(kernels.keys)
      tiledWorkspaces[n] = (kernels["tiled"] as? [String: Any])?["workspace_bytes"] as? Int
    }
    // Once both blocks are full (n ≥ Bk = 960), the tiles no longer grow with n.
    #expect(tiledWorkspaces[512] == Self.tiledWorkspace(512), "\(tiledWorkspaces)")
    #expect(tiledWorkspaces[1024] == Self.tiledWorkspace(1024), "\(tiledWorkspaces)")
    #expect(Self.tiledWorkspace(1024) == Self.tiledWorkspace(4096))
    #expect(
      present == [
        128: ["materialized", "tiled"], 256: ["materialized", "tiled"],
        512: ["tiled"], 1024: ["tiled"],
      ])
    let notes = try #require(report["notes"] as? [String])
    for n in [512, 1024] {
      #expect(
        notes.contains { $0.hasPrefix("n = \(n): materialized skipped") },
        "no note for n = \(n): \(notes)")
    }
    let fits = try #require(report["fit"] as? [String: Any])
    #expect(Set(fits.keys) == ["materialized", "tiled"], "two sizes are enough for a fit")
  }

  // MARK: Text and CSV

  @Test("text: the notebook's lines, the fits, the chart and the analysis")
  func text() throws {
    let run = try runComplexityCLI([
      "complexity", "--min-len", "128", "--max-len", "256", "--d-model", "8", "--repeats", "1",
    ])
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let lines = run.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    for expected in [
      "Seq len 128: Attention matrix size = 128x128 = 16,384 elements",
      "  Memory: 0.06 MB",
      "Seq len 256: Attention matrix size = 256x256 = 65,536 elements",
      "  Memory: 0.25 MB",
      "=== Complexity Analysis ===",
      "Time Complexity: O(n² × d) where n = sequence length, d = dimension",
      "Space Complexity: O(n²) for the attention matrix",
      "This is why:",
      "  - GPT-4 has a 128K context limit",
      "  - Efficient attention variants exist (Flash Attention, Linear Attention)",
      "  - Long sequences are expensive!",
    ] {
      #expect(lines.contains(expected), "missing line: \(expected)")
    }
    #expect(lines.contains { $0.hasPrefix("  measured: materialized time ∝ n^") })
    #expect(lines.contains { $0.contains("M materialized") && $0.contains("T tiled") })
    // stderr is not a terminal here: no progress lines.
    #expect(run.stderr.isEmpty, "stderr: \(run.stderr)")
  }

  @Test("the notebook's figures at the default sizes, and the sweep's sizes")
  func notebookFigures() throws {
    #expect(ComplexityCommand.grouped(16_384) == "16,384")
    #expect(ComplexityCommand.grouped(4_194_304) == "4,194,304")
    #expect(ComplexityCommand.grouped(256) == "256")
    #expect(ComplexityCommand.grouped(1_000) == "1,000")
    // 2048² floats: 16.00 MB of 1024² bytes.
    #expect(ComplexityRow(n: 2048).theoreticalMB == 16)
    #expect(String(format: "%.2f", ComplexityRow(n: 128).theoreticalMB) == "0.06")

    func sizes(_ arguments: [String]) throws -> [Int] {
      try ComplexityCommand.parse(arguments).sizes
    }
    #expect(try sizes([]) == [128, 256, 512, 1024, 2048])
    // Not a power of two: start at --min-len and double.
    #expect(try sizes(["--min-len", "100", "--max-len", "1000"]) == [100, 200, 400, 800])
    #expect(try sizes(["--min-len", "7", "--max-len", "7"]) == [7])
    #expect(try sizes(["--min-len", "1", "--max-len", "8"]) == [1, 2, 4, 8])
  }

  @Test("CSV: a header, then one row per (seq_len, kernel)")
  func csv() throws {
    let run = try runComplexityCLI([
      "complexity", "--min-len", "32", "--max-len", "128", "--d-model", "4", "--repeats", "2",
      "--kernel", "tiled", "--format", "csv",
    ])
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    let lines = run.stdout.split(separator: "\n").map(String.init)
    #expect(
      lines.first == "seq_len,kernel,elements,theoretical_mb,time_ms,gflops,"
        + "workspace_bytes,footprint_bytes,rss_growth_bytes")
    let rows = lines.dropFirst().map { $0.split(separator: ",", omittingEmptySubsequences: false) }
    #expect(rows.count == 3, "\(lines)")
    #expect(rows.map { String($0[0]) } == ["32", "64", "128"])
    #expect(rows.allSatisfy { $0.count == 9 && $0[1] == "tiled" })
    #expect(rows.map { String($0[2]) } == ["1024", "4096", "16384"])
  }

  // MARK: Plot

  @Test("--plot writes a valid SVG with both panels, and nothing else")
  func plot() throws {
    let folder = try complexityTemporaryFolder()
    defer { try? FileManager.default.removeItem(at: folder) }
    let path = folder.appendingPathComponent("complexity.svg").path
    let run = try runComplexityCLI([
      "complexity", "--min-len", "32", "--max-len", "256", "--d-model", "8", "--repeats", "1",
      "--format", "json", "--plot", path,
    ])
    try #require(run.status == 0, "exit \(run.status), stderr: \(run.stderr)")
    // Written atomically: the temporary file was renamed, none is left behind.
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["complexity.svg"])

    let data = try Data(contentsOf: URL(fileURLWithPath: path))
    let collector = ComplexitySVGCollector()
    let parser = XMLParser(data: data)
    parser.delegate = collector
    #expect(parser.parse(), "XML error: \(String(describing: parser.parserError))")
    #expect(collector.root == "svg")
    #expect(collector.namespace == "http://www.w3.org/2000/svg")
    #expect(
      collector.groupIDs.contains("memory") && collector.groupIDs.contains("time"),
      "group ids: \(collector.groupIDs)")
    // Per panel: the two kernels and the n² reference (dashed).
    #expect(collector.polylines == 6, "polylines: \(collector.polylines)")
    #expect(collector.dashedPolylines == 2, "dashed: \(collector.dashedPolylines)")
    for label in ["32", "64", "128", "256", "materialized", "tiled", "n² reference"] {
      #expect(collector.texts.contains(label), "no text \(label)")
    }
    #expect(collector.texts.contains { $0.hasPrefix("Attention complexity") }, "no title")
    #expect(collector.texts.contains { $0.contains("sequence length") }, "no x label")
  }

  @Test("--plot into a missing folder fails with exit 1, one line, and no file")
  func plotMissingFolder() throws {
    let folder = try complexityTemporaryFolder()
    defer { try? FileManager.default.removeItem(at: folder) }
    let path = folder.appendingPathComponent("missing/complexity.svg").path
    let run = try runComplexityCLI([
      "complexity", "--min-len", "16", "--max-len", "32", "--d-model", "4", "--repeats", "1",
      "--plot", path,
    ])
    #expect(run.status == 1, "exit \(run.status)")
    #expect(
      run.stderr.hasPrefix("attn: ") && run.stderr.filter { $0 == "\n" }.count == 1,
      "stderr: \(run.stderr)")
    #expect(run.stderr.contains("does not exist"), "stderr: \(run.stderr)")
    #expect(!FileManager.default.fileExists(atPath: path))
    #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).isEmpty)
  }

  // MARK: Usage errors

  @Test(
    "bad flags exit 64 with one line",
    arguments: [
      ["--min-len", "0"],
      ["--max-len", "0"],
      ["--min-len", "256", "--max-len", "128"],
      ["--repeats", "0"],
      ["--d-model", "0"],
      ["--threads", "0"],
      ["--max-memory", "lots"],
      ["--kernel", "fast"],
      ["--format", "xml"],
      ["--max-len", "2000000"],
    ])
  func usageErrors(flags: [String]) throws {
    let run = try runComplexityCLI(["complexity"] + flags)
    #expect(run.status == 64, "\(flags): exit \(run.status), stderr: \(run.stderr)")
    #expect(run.stdout.isEmpty, "\(flags): stdout \(run.stdout)")
    #expect(
      run.stderr.hasPrefix("attn: ") && run.stderr.filter { $0 == "\n" }.count == 1,
      "\(flags): stderr \(run.stderr)")
  }
}

// MARK: - Helpers (named for this file, so as not to clash with other test files)

/// The `attn` executable beside the test bundle: on Linux `.build/<triple>/<config>/` holds both
/// `attnPackageTests.xctest` (this process) and `attn`.
func complexityExecutableURL() throws -> URL {
  let testBinary = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
  let url = URL(fileURLWithPath: testBinary).deletingLastPathComponent()
    .appendingPathComponent("attn")
  guard FileManager.default.isExecutableFile(atPath: url.path) else {
    throw ComplexityTestError("no attn executable at \(url.path); build the package first")
  }
  return url
}

/// Runs `attn` with `arguments`; stdout and stderr go through files, so neither can fill a pipe
/// and block the child.
func runComplexityCLI(_ arguments: [String]) throws -> (
  status: Int32, stdout: String, stderr: String
) {
  let folder = try complexityTemporaryFolder()
  defer { try? FileManager.default.removeItem(at: folder) }
  let outURL = folder.appendingPathComponent("stdout")
  let errURL = folder.appendingPathComponent("stderr")
  guard FileManager.default.createFile(atPath: outURL.path, contents: nil),
    FileManager.default.createFile(atPath: errURL.path, contents: nil)
  else { throw ComplexityTestError("cannot create output files in \(folder.path)") }
  let out = try FileHandle(forWritingTo: outURL)
  let err = try FileHandle(forWritingTo: errURL)
  let process = Process()
  process.executableURL = try complexityExecutableURL()
  process.arguments = arguments
  process.standardOutput = out
  process.standardError = err
  try process.run()
  process.waitUntilExit()
  try out.close()
  try err.close()
  return (
    process.terminationStatus,
    try String(contentsOf: outURL, encoding: .utf8),
    try String(contentsOf: errURL, encoding: .utf8)
  )
}

func complexityTemporaryFolder() throws -> URL {
  let url = FileManager.default.temporaryDirectory
    .appendingPathComponent("attn-complexity-\(UUID().uuidString)")
  try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
  return url
}

struct ComplexityTestError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// Collects what the SVG test looks at: the root, group ids, polylines, and text content.
final class ComplexitySVGCollector: NSObject, XMLParserDelegate {
  var root: String?
  var namespace: String?
  var groupIDs: [String] = []
  var polylines = 0
  var dashedPolylines = 0
  var texts: [String] = []
  private var currentText: String?

  func parser(
    _ parser: XMLParser, didStartElement name: String, namespaceURI: String?,
    qualifiedName: String?, attributes: [String: String] = [:]
  ) {
    if root == nil {
      root = name
      namespace = attributes["xmlns"]
    }
    switch name {
    case "g": if let id = attributes["id"] { groupIDs.append(id) }
    case "polyline":
      polylines += 1
      if attributes["stroke-dasharray"] != nil { dashedPolylines += 1 }
    case "text": currentText = ""
    default: break
    }
  }

  func parser(_ parser: XMLParser, foundCharacters string: String) {
    currentText? += string
  }

  func parser(
    _ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?
  ) {
    if name == "text", let text = currentText {
      texts.append(text)
      currentText = nil
    }
  }
}
