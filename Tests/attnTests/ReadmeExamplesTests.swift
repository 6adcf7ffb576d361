import Foundation
import Testing

/// The `$ attn …` examples of README.md and of every Markdown file under `docs/` (subfolders
/// included), each run as its file shows it and compared with what it prints.
///
/// An example is a fenced code block whose first line is `$ attn …`: the command (split at
/// spaces; double quotes group, as in a shell; other shell syntax is refused), then the output
/// the file quotes, up to the closing fence. Each example runs in a fresh temporary folder as its
/// working directory, so that an output such as `--plot complexity.svg` lands there and is
/// removed afterwards; a link `Tests` there leads to the repository's `Tests` folder, so that an
/// example can read the committed fixtures (paths are written from the repository's root, in
/// `docs/` as in README). It passes when `attn` exits 0 and prints on stdout, line for line, what
/// the file shows (trailing spaces aside). A line `[… anything …]` stands for any number of
/// printed lines (a chart, a heatmap the file does not reproduce). A failure names the example
/// as `FILE:LINE`, the file relative to the repository's root.
///
/// How a file says to compare an example, and the margins, are in `ReadmeComparison`.
@Suite("README's and docs/' attn examples (the executable)")
struct ReadmeExamplesTests {
  @Test("A README or docs/ example prints what its file shows", arguments: ReadmeExamples.runnable)
  func example(_ example: ReadmeExample) throws {
    let run = try AttnCLI.withTemporaryFolder { folder in
      // Examples may read the committed fixtures as their files show them, `Tests/_TestSupport/…`.
      try FileManager.default.createSymbolicLink(
        at: folder.appendingPathComponent("Tests"),
        withDestinationURL: ReadmeExamples.root.appendingPathComponent("Tests"))
      return try AttnCLI.run(example.arguments, in: folder)
    }
    try #require(
      run.status == 0,
      "\(example.testDescription): exit \(run.status), stderr: \(run.stderr)")
    var printed = run.stdout.split(separator: "\n", omittingEmptySubsequences: false)
      .map(String.init)
    if printed.last == "" { printed.removeLast() }
    for failure in ReadmeComparison.failures(of: example, printed: printed) {
      Issue.record(Comment(rawValue: failure))
    }
  }

  @Test("The examples of README and docs/ are all found; the long ones are listed, not run")
  func inventory() throws {
    let documents = ReadmeExamples.documents
    #expect(
      documents.first?.file == "README.md", "README.md is not read first: \(ReadmeExamples.files)")
    #expect(
      documents.contains { $0.file.hasPrefix("docs/") },
      "no Markdown file found under \(ReadmeExamples.root.path)/docs")
    #expect(
      ReadmeExamples.readmeDocument.examples.contains { !$0.isLong },
      "no runnable `$ attn` example found in README.md")
    for parsed in documents {
      #expect(parsed.problems.isEmpty, "\(parsed.problems.joined(separator: "\n"))")
      // Every `$ attn` line of the file opens an example (none hides in a block the parser skips).
      let commandLines = parsed.readmeLines.indices.filter {
        parsed.readmeLines[$0].hasPrefix("$ attn ")
      }.map { $0 + 1 }
      let exampleLines = parsed.examples.map(\.line)
      #expect(
        commandLines == exampleLines,
        "\(parsed.file): `$ attn` lines \(commandLines), examples at \(exampleLines)")
      let longMarkers = parsed.readmeLines.filter {
        ReadmeExamples.markerOptions($0)?.contains("long") == true
      }
      let long = parsed.examples.filter(\.isLong)
      #expect(
        long.count == longMarkers.count,
        "\(parsed.file): long markers \(longMarkers), long examples \(long)")
      for example in long {
        #expect(!example.arguments.isEmpty, "\(example)")
        print("Example not run (marked long): \(example.testDescription)")
      }
    }
    let all = documents.flatMap(\.examples)
    #expect(all.filter(\.isLong).count + ReadmeExamples.runnable.count == all.count)
  }

  @Test("The comparison's own rules: commands, numbers, skeletons, margins")
  func rules() {
    #expect(
      ReadmeExamples.splitCommand("attn  dropout --p 0.1") == ["attn", "dropout", "--p", "0.1"])
    #expect(
      ReadmeExamples.splitCommand(#"attn relpos --out "my out.npy" --x "a\"b""#)
        == ["attn", "relpos", "--out", "my out.npy", "--x", #"a"b"#])
    #expect(ReadmeExamples.splitCommand(#"attn """#) == ["attn", ""])
    for refused in ["attn x | head", "attn 'x'", "attn > f", #"attn "$HOME""#, #"attn "open"#] {
      #expect(ReadmeExamples.splitCommand(refused) == nil, "\(refused)")
    }
    #expect(
      ReadmeComparison.numbers("= 128x128 = 16,384 elements [1, 4, 8] 6.52e-08 1e-4 0…8 n^1.83.")
        == ["128", "128", "16,384", "1", "4", "8", "6.52e-08", "1e-4", "0", "8", "1.83"])
    #expect(ReadmeComparison.skeleton("  workspace  64.00 KiB") == "  workspace# KiB")
    #expect(
      ReadmeComparison.timingSkeleton("tiled   1.031 ms  peak RSS +752.00 KiB")
        == ReadmeComparison.timingSkeleton("tiled  14.593 ms  peak RSS +1.38 MiB"))
    #expect(
      ReadmeComparison.timingSkeleton("median of 3 runs")
        != ReadmeComparison.timingSkeleton("median of 3 seeds"))
    func agrees(_ readme: String, _ printed: String, error: Bool = false) -> Bool {
      ReadmeComparison.disagreement(readme: readme, printed: printed, measuresError: error) == nil
    }
    #expect(agrees("16,384", "16384") && !agrees("3", "4"))
    #expect(agrees("18.8", "19.9") && !agrees("18.8", "20.0"))  // ± 0.94 + 0.2
    #expect(agrees("0.008", "0.012", error: true) && !agrees("0.008", "0.012"))
    #expect(agrees("6.52e-08", "2.0e-07") && !agrees("6.52e-08", "2.7e-07"))
    // A docs/ file's examples and problems are named by its path.
    let docs = ReadmeExamples.parse(
      "# T\n\n```\n$ attn dropout\nok\n```\n```\n$ attn x | head\n```\n", file: "docs/t.md")
    #expect(docs.examples.map(\.testDescription) == ["docs/t.md:4 $ attn dropout (deterministic)"])
    #expect(docs.problems.count == 1 && docs.problems[0].hasPrefix("docs/t.md:8: "), "\(docs)")
  }
}

/// One `$ attn …` example of README.md or of a Markdown file under `docs/`.
struct ReadmeExample: Sendable, CustomTestStringConvertible, CustomStringConvertible {
  enum Comparison: String, Sendable { case deterministic, timing }

  /// A line of the output the file shows, with its line number in the file.
  struct Line: Sendable {
    var number: Int
    var text: String
    /// `[… a chart …]`: any number of printed lines.
    var isElision: Bool { text.hasPrefix("[…") && text.hasSuffix("…]") }
  }

  /// The file, relative to the repository's root (`README.md`, `docs/commands.md`).
  var file: String
  /// The line of `$ attn …` in the file (1-based).
  var line: Int
  /// The command after `$ `.
  var command: String
  /// The arguments after `attn`.
  var arguments: [String]
  var expected: [Line]
  var comparison: Comparison
  var isLong: Bool

  var testDescription: String { "\(file):\(line) $ \(command) (\(comparison.rawValue))" }
  var description: String { testDescription }
}

enum ReadmeExamples {
  /// The package's root, found from this file: Tests/attnTests → the root.
  static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().deletingLastPathComponent()

  /// One Markdown file, parsed.
  struct Parsed: Sendable {
    /// The file, relative to the repository's root.
    var file = "README.md"
    var readmeLines: [String] = []
    var examples: [ReadmeExample] = []
    var problems: [String] = []
  }

  /// The files whose examples run: README.md, then every `.md` file under `docs/` (subfolders
  /// included), in the order of their paths.
  static let files: [String] = {
    let docs = root.appendingPathComponent("docs").path
    let found = FileManager.default.enumerator(atPath: docs)?.compactMap { $0 as? String } ?? []
    return ["README.md"] + found.filter { $0.hasSuffix(".md") }.sorted().map { "docs/" + $0 }
  }()

  static let documents: [Parsed] = files.map { file in
    let url = root.appendingPathComponent(file)
    guard let text = try? String(contentsOf: url, encoding: .utf8) else {
      return Parsed(file: file, problems: ["cannot read \(url.path)"])
    }
    return parse(text, file: file)
  }

  /// README.md's examples and problems.
  static var readmeDocument: Parsed { documents[0] }

  /// Every example not marked long, README's first.
  static let runnable: [ReadmeExample] = documents.flatMap(\.examples).filter { !$0.isLong }

  static let knownOptions: Set<String> = ["long", "timing"]

  /// The options of `<!-- readme-test: a, b -->`, or nil when `line` is no such marker.
  static func markerOptions(_ line: String) -> [String]? {
    let trimmed = line.trimmingCharacters(in: .whitespaces)
    let prefix = "<!-- readme-test:"
    guard trimmed.hasPrefix(prefix), trimmed.hasSuffix("-->") else { return nil }
    return trimmed.dropFirst(prefix.count).dropLast(3)
      .split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init)
  }

  /// The examples of `text`, the content of `file` (named in the examples and the problems).
  static func parse(_ text: String, file: String = "README.md") -> Parsed {
    var parsed = Parsed(file: file)
    parsed.readmeLines = text.split(separator: "\n", omittingEmptySubsequences: false).map {
      String($0.hasSuffix("\r") ? $0.dropLast() : $0)
    }
    let lines = parsed.readmeLines
    var index = 0
    var markersUsed = Set<Int>()
    while index < lines.count {
      defer { index += 1 }
      guard lines[index].hasPrefix("```") else { continue }
      // An opening fence: find its closing fence, whatever the block holds.
      let open = index
      var close = open + 1
      while close < lines.count && lines[close] != "```" { close += 1 }
      index = close
      guard open + 1 < close, lines[open + 1].hasPrefix("$ attn ") else { continue }
      let commandLine = lines[open + 1]
      var options: [String] = []
      if open > 0, let marker = markerOptions(lines[open - 1]) {
        options = marker
        markersUsed.insert(open - 1)
        for option in marker where !knownOptions.contains(option) {
          parsed.problems.append("\(file):\(open): unknown readme-test option \"\(option)\"")
        }
      }
      if close == lines.count {
        parsed.problems.append("\(file):\(open + 1): the example's fence is not closed")
      }
      let command = String(commandLine.dropFirst(2))
      guard let words = splitCommand(command), words.first == "attn" else {
        parsed.problems.append(
          "\(file):\(open + 2): \"\(command)\" uses shell syntax this test does not run")
        continue
      }
      parsed.examples.append(
        ReadmeExample(
          file: file, line: open + 2, command: command, arguments: Array(words.dropFirst()),
          expected: (open + 2..<close).map { .init(number: $0 + 1, text: lines[$0]) },
          comparison: options.contains("timing") ? .timing : .deterministic,
          isLong: options.contains("long")))
    }
    for (number, line) in lines.enumerated()
    where markerOptions(line) != nil && !markersUsed.contains(number) {
      parsed.problems.append(
        "\(file):\(number + 1): a readme-test marker not on the line before a `$ attn` example")
    }
    return parsed
  }

  /// Splits a command line at spaces, as a shell would for plain words and double-quoted ones
  /// (`\"`, `\\`, `\$` and `` \` `` escaped inside the quotes); nil for anything else a shell
  /// would interpret (single quotes, escapes outside quotes, expansions, globs, redirections,
  /// pipes), which this test does not emulate.
  static func splitCommand(_ command: String) -> [String]? {
    var words: [String] = []
    var word = ""
    var inWord = false
    var quoted = false
    var escaped = false
    for character in command {
      if quoted {
        if escaped {
          guard "\"\\$`".contains(character) else { return nil }
          word.append(character)
          escaped = false
        } else if character == "\\" {
          escaped = true
        } else if character == "\"" {
          quoted = false
        } else if character == "$" || character == "`" {
          return nil
        } else {
          word.append(character)
        }
      } else if character == " " || character == "\t" {
        if inWord { words.append(word) }
        word = ""
        inWord = false
      } else if character == "\"" {
        quoted = true
        inWord = true
      } else if "'\\|&;<>()$`*?[~#".contains(character) {
        return nil
      } else {
        word.append(character)
        inWord = true
      }
    }
    guard !quoted else { return nil }
    if inWord { words.append(word) }
    return words
  }
}

/// Comparing what an example printed with what its file (README.md or a docs/ file) shows.
///
/// An HTML comment on the line just before the opening fence says how to compare:
///
/// - none — **deterministic output.** Each printed line must equal the file's line with its
///   numbers taken out (the *skeleton*: every number, with the spaces that pad it on the left,
///   becomes `#`), and each number must agree with the file's:
///   - integers (shapes, counts, seeds, lengths, bytes) **exactly**: the inputs come from seeded
///     generators and the dropout decisions are a pure function of (seed, row, key), so no count
///     depends on the CPU, the threads or OpenBLAS;
///   - rounding-error measurements — decimals below 1e-4 in magnitude (`max |sum − 1| =
///     6.52e-08`) and decimals that follow the word `error` on their line (`worst error / bound
///     = 0.188`) — **within a factor of 4**: they measure float32 rounding, which moves with the
///     sgemm kernel OpenBLAS picks for the CPU (its blocking, its use of FMA). Forcing each of
///     OpenBLAS's cores on one machine (`OPENBLAS_CORETYPE=SkylakeX`, `Haswell`, `Sandybridge`,
///     `Prescott`) moved them by up to 1.5× (6.52e-08 → 4.84e-08, 0.040 → 0.033, 0.139 → 0.110,
///     0.008 → 0.012), which the margin below would refuse; a factor of 4 still catches an error
///     that grew out of proportion, and the check's ✓ already says that the bound holds;
///   - other decimals **within 5 % of the file's value plus 2 units of the last printed digit**
///     (`0.918 ± 0.048`, `18.8 ± 1.14`): they are float32 results printed to 3–4 digits, exact to
///     about 1e-7 relative (none of them moved across the four OpenBLAS cores above), so 2 units
///     absorb a last digit that rounds the other way on another CPU, and 5 % leaves room for a
///     value computed through another sgemm; a stale figure (another default, another formula,
///     another seed) is off by far more.
/// - `<!-- readme-test: timing -->` — **measured times and memory.** Lines without digits must
///   be equal; lines with digits are compared by their skeleton only, in which a byte or time
///   unit right after a number goes with it (a measured `+720.00 KiB` prints as `+1.38 MiB` on
///   another run) and runs of spaces count as one (columns are padded to the numbers' widths).
/// - `<!-- readme-test: long -->` — **not run** (too slow for the test run). Swift Testing cannot
///   skip one argument of a parameterized test at run time, so long examples are left out of the
///   arguments, and `ReadmeExamplesTests.inventory()` checks that they were parsed and names
///   them in its output. Markers combine: `<!-- readme-test: long, timing -->`.
enum ReadmeComparison {
  enum Piece: Equatable {
    case text(String)
    case number(String)
  }

  static func isDigit(_ character: Character) -> Bool {
    guard let ascii = character.asciiValue else { return false }
    return ascii >= 48 && ascii <= 57
  }

  /// A line cut into text and numbers: `16,384`, `0.918`, `6.52e-08`, `1e-4` (a sign stays in
  /// the text).
  static func pieces(_ line: String) -> [Piece] {
    let characters = Array(line)
    var pieces: [Piece] = []
    var text = ""
    var index = 0
    func digits(from start: Int) -> Int {
      var end = start
      while end < characters.count && isDigit(characters[end]) { end += 1 }
      return end
    }
    while index < characters.count {
      guard isDigit(characters[index]) else {
        text.append(characters[index])
        index += 1
        continue
      }
      var end = digits(from: index)
      // Thousands separators: a comma followed by exactly three digits.
      while end + 3 < characters.count, characters[end] == ",",
        digits(from: end + 1) == end + 4
      {
        end += 4
      }
      if end + 1 < characters.count, characters[end] == ".", isDigit(characters[end + 1]) {
        end = digits(from: end + 1)
      }
      if end + 1 < characters.count, characters[end] == "e" || characters[end] == "E" {
        var exponent = end + 1
        if exponent < characters.count, characters[exponent] == "-" || characters[exponent] == "+" {
          exponent += 1
        }
        if exponent < characters.count, isDigit(characters[exponent]) {
          end = digits(from: exponent)
        }
      }
      if !text.isEmpty { pieces.append(.text(text)) }
      text = ""
      pieces.append(.number(String(characters[index..<end])))
      index = end
    }
    if !text.isEmpty { pieces.append(.text(text)) }
    return pieces
  }

  static func numbers(_ line: String) -> [String] {
    pieces(line).compactMap { if case .number(let n) = $0 { n } else { nil } }
  }

  /// Deterministic lines: each number, with the spaces padding it on its left, becomes `#`.
  static func skeleton(_ line: String) -> String {
    var result = ""
    for piece in pieces(line) {
      switch piece {
      case .text(let text): result += text
      case .number:
        while result.last == " " { result.removeLast() }
        result += "#"
      }
    }
    return result
  }

  static let units = ["B", "KiB", "MiB", "GiB", "TiB", "ns", "µs", "us", "ms", "s"]

  /// Timing lines: as `skeleton`, a unit right after a number goes with it, and runs of spaces
  /// count as one.
  static func timingSkeleton(_ line: String) -> String {
    var result = ""
    var afterNumber = false
    for piece in pieces(line) {
      switch piece {
      case .number:
        result += " # "
        afterNumber = true
      case .text(var text):
        if afterNumber {
          let rest = text.drop(while: { $0 == " " })
          for unit in units where rest.hasPrefix(unit) {
            let after = rest.dropFirst(unit.count)
            if after.first.map({ !$0.isLetter }) ?? true {
              text = String(after)
              break
            }
          }
        }
        result += text
        afterNumber = false
      }
    }
    return result.split(separator: " ").joined(separator: " ")
  }

  static func hasDigits(_ line: String) -> Bool { line.contains(where: isDigit) }

  static func trimmed(_ line: String) -> String {
    var line = line
    while line.last == " " || line.last == "\t" { line.removeLast() }
    return line
  }

  /// Whether a printed line has the shape of README's line.
  static func sameShape(
    _ readme: String, _ printed: String, _ comparison: ReadmeExample.Comparison
  ) -> Bool {
    switch comparison {
    case .deterministic: return skeleton(readme) == skeleton(printed)
    case .timing:
      return hasDigits(readme)
        ? timingSkeleton(readme) == timingSkeleton(printed) : readme == printed
    }
  }

  /// Why `printed` does not agree with README's `readme` (see the margins above), or nil when
  /// it does. `measuresError`: the number follows the word `error` on its line.
  static func disagreement(readme: String, printed: String, measuresError: Bool) -> String? {
    let plainReadme = readme.replacingOccurrences(of: ",", with: "")
    let plainPrinted = printed.replacingOccurrences(of: ",", with: "")
    guard let expected = Double(plainReadme), let actual = Double(plainPrinted) else {
      return "cannot read \(readme) or \(printed) as numbers"
    }
    let isInteger = !plainReadme.contains(where: { $0 == "." || $0 == "e" || $0 == "E" })
    if isInteger {
      return expected == actual && plainPrinted == String(Int(actual)) ? nil : "integers differ"
    }
    if abs(expected) < 1e-4 || measuresError {
      if expected == 0 || actual == 0 {
        return expected == actual ? nil : "a rounding error of 0 on one side only"
      }
      let ratio = actual / expected
      return ratio >= 0.25 && ratio <= 4 ? nil : "not within a factor of 4 (rounding error)"
    }
    let tolerance = 0.05 * abs(expected) + 2 * max(lastDigit(plainReadme), lastDigit(plainPrinted))
    return abs(actual - expected) <= tolerance
      ? nil : "not within 5 % + 2 units of the last digit (± \(tolerance))"
  }

  /// The value of one unit of the last printed digit: 0.01 for `0.06`, 1e-10 for `6.52e-08`.
  static func lastDigit(_ number: String) -> Double {
    let parts = number.split(whereSeparator: { $0 == "e" || $0 == "E" })
    let mantissa = parts.first ?? ""
    let exponent = parts.count > 1 ? Int(parts[1]) ?? 0 : 0
    let decimals = mantissa.split(separator: ".").dropFirst().first?.count ?? 0
    return pow(10, Double(exponent - decimals))
  }

  /// Every way `printed` fails to be what `example`'s file shows; empty when it passes.
  static func failures(of example: ReadmeExample, printed rawPrinted: [String]) -> [String] {
    let expected = example.expected.map { line in
      ReadmeExample.Line(number: line.number, text: trimmed(line.text))
    }
    let printed = rawPrinted.map(trimmed)
    let header = "\(example.file):\(example.line) $ \(example.command)"
    guard let pairs = align(expected, printed, example.comparison) else {
      return [
        "\(header): \(mismatch(expected, printed, example.comparison, file: example.file))\n"
          + "printed:\n\(rawPrinted.joined(separator: "\n"))"
      ]
    }
    guard example.comparison == .deterministic else { return [] }
    var failures: [String] = []
    for (readmeLine, printedIndex) in pairs {
      var measuresError = false
      let readmePieces = pieces(readmeLine.text)
      let printedNumbers = numbers(printed[printedIndex])
      var position = 0
      for piece in readmePieces {
        switch piece {
        case .text(let text):
          if text.lowercased().contains("error") { measuresError = true }
        case .number(let number):
          defer { position += 1 }
          guard position < printedNumbers.count else { continue }
          if let why = disagreement(
            readme: number, printed: printedNumbers[position], measuresError: measuresError)
          {
            failures.append(
              "\(header): \(example.file):\(readmeLine.number) shows \(number), attn printed "
                + "\(printedNumbers[position]): \(why)\n  shown: \(readmeLine.text)\n  "
                + "printed: \(printed[printedIndex])")
          }
        }
      }
    }
    return failures
  }

  /// Matches README's lines to the printed ones, an elision standing for any number of lines:
  /// for each README line that is not an elision, the index of its printed line; nil when the
  /// printed lines cannot be matched so.
  static func align(
    _ expected: [ReadmeExample.Line], _ printed: [String], _ comparison: ReadmeExample.Comparison
  ) -> [(ReadmeExample.Line, Int)]? {
    let m = expected.count
    let n = printed.count
    // matches[i][j]: README lines i… match printed lines j….
    var matches = Array(repeating: Array(repeating: false, count: n + 1), count: m + 1)
    matches[m][n] = true
    for i in stride(from: m - 1, through: 0, by: -1) {
      for j in stride(from: n, through: 0, by: -1) {
        if expected[i].isElision {
          matches[i][j] = matches[i + 1][j] || (j < n && matches[i][j + 1])
        } else {
          matches[i][j] =
            j < n && matches[i + 1][j + 1] && sameShape(expected[i].text, printed[j], comparison)
        }
      }
    }
    guard matches[0][0] else { return nil }
    var pairs: [(ReadmeExample.Line, Int)] = []
    var i = 0
    var j = 0
    while i < m {
      if expected[i].isElision {
        if matches[i + 1][j] { i += 1 } else { j += 1 }
      } else {
        pairs.append((expected[i], j))
        i += 1
        j += 1
      }
    }
    return pairs
  }

  /// The first place where the printed lines stop following the file's, for the failure
  /// message.
  static func mismatch(
    _ expected: [ReadmeExample.Line], _ printed: [String], _ comparison: ReadmeExample.Comparison,
    file: String = "README.md"
  ) -> String {
    var j = 0
    for (i, line) in expected.enumerated() {
      if line.isElision {
        guard i + 1 < expected.count else { return "the output ends differently" }
        let next = expected[i + 1]
        guard let found = printed[j...].firstIndex(where: { sameShape(next.text, $0, comparison) })
        else {
          return "\(file):\(next.number) \"\(next.text)\" is not printed after the elision"
        }
        j = found
        continue
      }
      guard j < printed.count else {
        return "\(file):\(line.number) \"\(line.text)\": attn printed only \(printed.count) lines"
      }
      guard sameShape(line.text, printed[j], comparison) else {
        return "\(file):\(line.number) \"\(line.text)\" but attn printed (line \(j + 1)) "
          + "\"\(printed[j])\""
      }
      j += 1
    }
    return j < printed.count
      ? "attn printed more lines than \(file) shows, from line \(j + 1): \"\(printed[j])\""
      : "the output does not match \(file)"
  }
}
