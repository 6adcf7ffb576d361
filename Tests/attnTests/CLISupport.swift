import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Running the built `attn` executable from the tests, with a fresh temporary folder per test.
/// (Names are prefixed so as not to clash with the other CLI test files of this target.)
enum AttnCLI {
  /// The `attn` executable beside this test process: on Linux `.build/<triple>/<config>/` holds
  /// both `attnPackageTests.xctest` (found through `/proc/self/exe`) and `attn`.
  static func executable() throws -> URL {
    let candidates: [URL] = [
      (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        .map { URL(fileURLWithPath: $0) },
      URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL,
      Bundle.main.executableURL,
    ].compactMap { $0?.deletingLastPathComponent().appendingPathComponent("attn") }
    guard
      let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0.path) })
    else {
      throw AttnCLIError(
        "no attn executable beside the test binary (looked at \(candidates.map(\.path))); "
          + "build the package (swift build) before running these tests")
    }
    return found
  }

  struct Run {
    var status: Int32
    var stdout: String
    var stderr: String

    /// The non-empty lines of stderr.
    var stderrLines: [Substring] { stderr.split(separator: "\n") }
  }

  /// A running child and the files its output goes to: a folder of its own, never the folder
  /// a test compares, so that neither stream can fill a pipe and block the child.
  struct Child {
    var process: Process
    var logs: URL

    func stdout() -> Data {
      (try? Data(contentsOf: logs.appendingPathComponent("stdout"))) ?? Data()
    }

    func stderrData() -> Data {
      (try? Data(contentsOf: logs.appendingPathComponent("stderr"))) ?? Data()
    }

    func stderr() -> String { String(decoding: stderrData(), as: UTF8.self) }

    func cleanUp() { try? FileManager.default.removeItem(at: logs) }
  }

  /// Starts `executable arguments…` (attn by default) in `folder`, with `$ATTN` set to attn's
  /// path and `environment` added to (or overriding) this process's variables.
  static func start(
    executable: URL? = nil, _ arguments: [String], in folder: URL,
    environment extra: [String: String] = [:]
  ) throws -> Child {
    let logs = FileManager.default.temporaryDirectory
      .appendingPathComponent("attn-cli-logs-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: logs, withIntermediateDirectories: true)
    let outURL = logs.appendingPathComponent("stdout")
    let errURL = logs.appendingPathComponent("stderr")
    guard FileManager.default.createFile(atPath: outURL.path, contents: nil),
      FileManager.default.createFile(atPath: errURL.path, contents: nil)
    else { throw AttnCLIError("cannot create log files in \(logs.path)") }
    let out = try FileHandle(forWritingTo: outURL)
    let err = try FileHandle(forWritingTo: errURL)
    defer {
      try? out.close()
      try? err.close()
    }
    let process = Process()
    process.executableURL = try executable ?? Self.executable()
    process.arguments = arguments
    process.currentDirectoryURL = folder
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    var environment = ProcessInfo.processInfo.environment
    environment["NO_COLOR"] = "1"
    environment["ATTN"] = try Self.executable().path
    environment.merge(extra) { _, new in new }
    process.environment = environment
    try process.run()
    return Child(process: process, logs: logs)
  }

  /// Runs `attn arguments…` in `folder` and waits for it.
  static func run(
    _ arguments: [String], in folder: URL, environment extra: [String: String] = [:]
  ) throws -> Run {
    let child = try start(arguments, in: folder, environment: extra)
    defer { child.cleanUp() }
    child.process.waitUntilExit()
    return Run(
      status: child.process.terminationStatus,
      stdout: String(decoding: child.stdout(), as: UTF8.self), stderr: child.stderr())
  }

  /// A fresh, empty temporary folder; `body` runs with it and it is removed afterwards.
  static func withTemporaryFolder<T>(_ body: (URL) throws -> T) throws -> T {
    let folder = FileManager.default.temporaryDirectory
      .appendingPathComponent("attn-cli-tests-\(UUID().uuidString)", isDirectory: true)
    try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: folder) }
    return try body(folder)
  }

  /// The visible entries of `folder` (the run logs are hidden and already removed).
  static func contents(of folder: URL) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
  }
}

struct AttnCLIError: Error, CustomStringConvertible {
  var description: String
  init(_ description: String) { self.description = description }
}

/// An SDPA case of the AttentionKit fixtures (`Tests/_TestSupport/Fixtures/reference`),
/// read with JSONSerialization: the absolute paths of its files.
struct CLIFixtureCase {
  static let folder = Fixtures.folder("reference")

  var q: String
  var k: String
  var v: String
  var expectedOutput: String
  var expectedWeights: String
  var scale: Double
  var maxAbsScore: Double

  init(named name: String) throws {
    let data = try Data(contentsOf: Self.folder.appendingPathComponent("manifest.json"))
    let manifest = try JSONSerialization.jsonObject(with: data) as? [String: Any]
    let cases = manifest?["sdpa"] as? [[String: Any]] ?? []
    guard let entry = cases.first(where: { $0["name"] as? String == name }) else {
      throw AttnCLIError("no sdpa case \(name) in \(Self.folder.path)/manifest.json")
    }
    func path(_ ref: Any?) throws -> String {
      guard let file = (ref as? [String: Any])?["file"] as? String else {
        throw AttnCLIError("case \(name): missing file reference")
      }
      return Self.folder.appendingPathComponent(file).path
    }
    let expected = entry["expected"] as? [String: Any]
    q = try path(entry["q"])
    k = try path(entry["k"])
    v = try path(entry["v"])
    expectedOutput = try path(expected?["output"])
    expectedWeights = try path(expected?["weights"])
    scale = entry["scale"] as? Double ?? .nan
    maxAbsScore = entry["max_abs_score"] as? Double ?? .nan
  }

  /// A `<f8` file at full precision.
  static func doubles(atPath path: String) throws -> [Double] {
    try NPY.readDoubles(contentsOf: path).values
  }
}
