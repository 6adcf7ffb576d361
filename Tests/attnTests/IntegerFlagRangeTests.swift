import AttentionKit
import Foundation
import TensorIO
import Testing
import _TestSupport

/// Issue #23 item 5: every integer flag of every subcommand, driven with 0, −1, 2⁶³ − 1 and 2³¹.
/// A value outside a flag's range is a usage error (exit 64, one line naming the flag), never an
/// arithmetic trap, an allocation attempt or a runtime error found after work started. 0 is
/// either legal (a seed, an offset, a count of warm-up runs) or a usage error; the large values
/// are legal only for the flags whose every value is meaningful (seeds, a row count that is
/// capped at the rows there are) and, 2³¹ only, a byte budget (up to 1024T).
///
/// The table is checked against `attn <command> --experimental-dump-help`: every option of every
/// subcommand is either listed here or named as non-integer, so a new integer flag cannot be
/// missed.
@Suite("Integer flags keep every derived quantity in range (#23 item 5)")
struct IntegerFlagRangeTests {
  struct Flag: Sendable, CustomTestStringConvertible {
    var command: String
    var name: String
    /// Flags this one needs to mean anything (`--explain` for `--explain-batch`).
    var with: [String] = []
    /// Which of 2⁶³ − 1 and 2³¹ are legal values (exit 0).
    var legalLarge: Set<String> = []
    /// Whether 0 may be a runtime error (a zero byte budget refuses the first buffer).
    var zeroMayFailAtRuntime = false

    var testDescription: String { "\(command) \(name)" }
  }

  static let twoTo31 = "2147483648"
  static let large: Set<String> = ["9223372036854775807", twoTo31]
  static let values = ["0", "-1", "9223372036854775807", twoTo31]

  static let mhaFixture = Fixtures.folder("mha")

  /// Arguments that make each subcommand's run tiny; a driven flag given after them wins.
  static func base(_ command: String) -> [String] {
    switch command {
    case "dropout", "backward": return ["--seq-len", "4", "--d-k", "4"]
    case "complexity":
      return ["--max-len", "64", "--min-len", "32", "--repeats", "1", "--d-model", "8"]
    case "relpos": return ["--seq-len", "4", "--d-model", "8", "--max-rel", "2", "--batch", "1"]
    case "sdpa": return ["--query", "q.npy", "--key", "k.npy", "--value", "v.npy"]
    case "check":
      return ["--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--output", "o.npy"]
    case "mha":
      let name = "mha__llama_gqa4_offset0__"
      return [
        "--weights", mhaFixture.appendingPathComponent(name + "weights.safetensors").path,
        "--input", mhaFixture.appendingPathComponent(name + "input.npy").path,
        "--layout", "llama", "--prefix", "model.layers.0.self_attn.", "--heads", "8",
        "--kv-heads", "2",
      ]
    case "bench":
      return [
        "--seq-len", "64", "--heads", "1", "--batch", "1", "--d-k", "8", "--repeats", "1",
      ]
    default: return []
    }
  }

  static let flags: [Flag] = {
    func common(_ command: String) -> [Flag] {
      [
        Flag(command: command, name: "--seed", legalLarge: large),
        Flag(command: command, name: "--threads"),
        Flag(
          command: command, name: "--max-memory", legalLarge: [twoTo31], zeroMayFailAtRuntime: true),
      ]
    }
    let explain = { (command: String) -> [Flag] in
      [
        Flag(command: command, name: "--explain-batch", with: ["--explain"]),
        Flag(command: command, name: "--precision", with: ["--explain"]),
      ]
    }
    var all: [Flag] = []
    for command in ["dropout", "backward"] {
      all += ["--seq-len", "--d-k", "--batch"].map { Flag(command: command, name: $0) }
      all += common(command) + explain(command)
    }
    all += ["--max-len", "--min-len", "--d-model", "--repeats"].map {
      Flag(command: "complexity", name: $0)
    }
    all += common("complexity")
    all += ["--d-model", "--max-rel", "--seq-len", "--batch"].map {
      Flag(command: "relpos", name: $0)
    }
    all += common("relpos") + explain("relpos")
    all +=
      [
        Flag(command: "sdpa", name: "--window"), Flag(command: "sdpa", name: "--t5-max-distance"),
      ] + common("sdpa")
    all += [
      Flag(command: "check", name: "--window"),
      Flag(command: "check", name: "--t5-max-distance"),
      Flag(command: "check", name: "--rows", legalLarge: large),
      Flag(command: "check", name: "--seed", legalLarge: large),
      Flag(command: "check", name: "--threads"),
      Flag(
        command: "check", name: "--max-memory", legalLarge: [twoTo31], zeroMayFailAtRuntime: true),
    ]
    all += ["--heads", "--kv-heads", "--position-offset"].map { Flag(command: "mha", name: $0) }
    all += [Flag(command: "mha", name: "--heatmap-batch", with: ["--heatmap", "h.svg"])]
    all += common("mha")
    all += [
      "--batch", "--heads", "--seq-len", "--d-k", "--tq", "--tk", "--kv-heads", "--window",
      "--repeats", "--warmup", "--query-block", "--key-block",
    ].map { Flag(command: "bench", name: $0) }
    all += [Flag(command: "bench", name: "--max-rel", with: ["--relpos"])] + common("bench")
    return all
  }()

  /// Options that take no integer (paths, enums, probabilities, scales, text).
  static let nonInteger: [String: Set<String>] = [
    "dropout": [
      "--p", "--rng", "--mask", "--bias", "--q", "--k", "--v", "--out", "--weights-out",
      "--format", "--kernel", "--heatmap",
    ],
    "backward": [
      "--p", "--rng", "--mask", "--bias", "--q", "--k", "--v", "--grad-out", "--dq-out",
      "--dk-out", "--dv-out", "--dbias-out", "--format", "--kernel",
    ],
    "complexity": ["--kernel", "--plot", "--format"],
    "relpos": [
      "--rng", "--input", "--weights", "--save-weights", "--mask", "--out", "--weights-out",
      "--grad-out", "--dx-out", "--grads-out", "--format", "--kernel", "--heatmap",
    ],
    "sdpa": [
      "--query", "--key", "--value", "--attn-mask", "--causal-align", "--scale", "--dropout-p",
      "--out", "--weights-out", "--out-dtype", "--format", "--kernel", "--softcap",
      "--alibi-slopes", "--t5-bias", "--sinks", "--grad-out", "--dq-out", "--dk-out", "--dv-out",
      "--dsinks-out", "--dt5-out", "--dmask-out", "--kv-dtype",
    ],
    "check": [
      "--query", "--key", "--value", "--attn-mask", "--causal-align", "--scale", "--output",
      "--weights", "--grad-out", "--dq", "--dk", "--dv", "--precision", "--format",
      "--softcap", "--alibi-slopes", "--t5-bias", "--sinks",
    ],
    "mha": [
      "--weights", "--layout", "--prefix", "--rope-theta", "--rope-layout", "--layer-norm-eps",
      "--input", "--key-padding-mask", "--attn-mask", "--out", "--weights-out", "--heatmap",
      "--tokens", "--format", "--kernel", "--model", "--layer", "--kv-cache",
    ],
    "bench": ["--p", "--causal-align", "--cases", "--read", "--format", "--kv-dtype"],
  ]

  /// q.npy, k.npy, v.npy (`[1, 2, 6, 4]`) and o.npy, their attention from `attn sdpa` (what
  /// `check` is handed as a candidate; its own verification is not what these tests are about).
  static func prepare(_ folder: URL) throws {
    for (name, stream) in [
      ("q", RandomStream.queries), ("k", RandomStream.keys), ("v", RandomStream.values),
    ] {
      let tensor = try Tensor.randomNormal(shape: [1, 2, 6, 4], seed: 5, stream: stream)
      try Data(NPY.encode(tensor)).write(to: folder.appendingPathComponent("\(name).npy"))
    }
    let run = try AttnCLI.run(
      ["sdpa", "--query", "q.npy", "--key", "k.npy", "--value", "v.npy", "--out", "o.npy"],
      in: folder)
    try #require(run.status == 0, "sdpa: \(run.stderr)")
  }

  @Test("every option is listed, as an integer flag or not", arguments: nonInteger.keys.sorted())
  func tableIsComplete(command: String) throws {
    let run = try AttnCLI.withTemporaryFolder {
      try AttnCLI.run([command, "--experimental-dump-help"], in: $0)
    }
    try #require(run.status == 0, "\(run.stderr)")
    let json = try #require(
      JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
    let arguments = (json["command"] as? [String: Any])?["arguments"] as? [[String: Any]] ?? []
    let options = Set(
      arguments.filter { $0["kind"] as? String == "option" }.compactMap { argument in
        (argument["names"] as? [[String: Any]])?.first { $0["kind"] as? String == "long" }
          .flatMap { $0["name"] as? String }.map { "--" + $0 }
      })
    let integers = Set(Self.flags.filter { $0.command == command }.map(\.name))
    let listed = integers.union(Self.nonInteger[command] ?? [])
    let unlisted = options.subtracting(listed).sorted()
    let gone = listed.subtracting(options).sorted()
    #expect(options == listed, "unlisted: \(unlisted); gone: \(gone)")
    #expect(integers.isDisjoint(with: Self.nonInteger[command] ?? []))
  }

  @Test(
    "0, −1, 2⁶³ − 1 and 2³¹: in range or a one-line usage error, never a trap", arguments: flags)
  func driven(flag: Flag) throws {
    try AttnCLI.withTemporaryFolder { folder in
      try Self.prepare(folder)
      for value in Self.values {
        let arguments =
          [flag.command] + Self.base(flag.command) + flag.with + [
            "\(flag.name)=\(value)"
          ]
        let run = try AttnCLI.run(arguments, in: folder)
        let shown = arguments.joined(separator: " ")
        // A trap is a signal (exit 128 + n from the shell; a negative or ≥ 128 status here).
        #expect(
          [0, 1, 64].contains(run.status), "\(shown): exit \(run.status)\n\(run.stderr.prefix(400))"
        )
        if run.status != 0 {
          #expect(run.stderrLines.count == 1, "\(shown): \(run.stderr.prefix(400))")
        }
        let expected: Set<Int32> =
          switch value {
          case "-1": [64]
          case "0": flag.zeroMayFailAtRuntime ? [0, 1, 64] : [0, 64]
          default: flag.legalLarge.contains(value) ? [0] : [64]
          }
        #expect(expected.contains(run.status), "\(shown): exit \(run.status), \(run.stderr)")
        if run.status == 64 && value != "-1" {
          #expect(
            run.stderr.contains(flag.name),
            "\(shown): the error does not name the flag: \(run.stderr)")
        }
      }
    }
  }
}
