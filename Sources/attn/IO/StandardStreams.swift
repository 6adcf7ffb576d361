import Foundation
import TensorIO

/// The process's standard streams, made safe to fail: every write to standard output is checked
/// (at the end, through stdio's error flag), a failing or closed standard error never crashes the
/// process, and an output file named `-` or `/dev/stdout` gets standard output to itself.
enum StandardStreams {
  /// Whether standard output was closed when the process started (`>&-`).
  nonisolated(unsafe) private static var stdoutWasClosed = false
  /// C's `stdout`, where `print` writes (the C library's descriptor-1 stream).
  nonisolated(unsafe) private static let standardOutput = fdopenStandardOutput()

  private static func fdopenStandardOutput() -> UnsafeMutablePointer<FILE>? {
    // Swift 6 refuses to read C's mutable global `stdout` directly; the dynamic linker hands
    // out the same variable (RTLD_DEFAULT is the null handle on glibc).
    dlsym(nil, "stdout")?
      .assumingMemoryBound(to: UnsafeMutablePointer<FILE>?.self).pointee
  }

  /// The flags whose value is an output path.
  static let outputFlags: Set<String> = [
    "--out", "--weights-out", "--save-weights", "--plot", "--heatmap",
  ]

  /// Opens `/dev/null` on any of descriptors 0, 1 and 2 that is closed, so that no file opened
  /// later takes its number (an output file would otherwise receive the report printed to a
  /// closed standard output).
  static func prepare() {
    recordInitialDescriptors()
    for descriptor: Int32 in 0...2 where fcntl(descriptor, F_GETFD) < 0 && errno == EBADF {
      if descriptor == 1 { stdoutWasClosed = true }
      let opened = open("/dev/null", descriptor == 0 ? O_RDONLY : O_WRONLY)
      if opened >= 0 && opened != descriptor {
        dup2(opened, descriptor)
        close(opened)
      }
    }
  }

  /// `arguments` with every output path that names standard output (`-`, `/dev/stdout`,
  /// `/dev/fd/1`, `/proc/self/fd/1`) replaced by a copy of the descriptor, and standard output
  /// itself pointed at standard error, so that the report and the data never mix.
  static func separatingOutputs(_ arguments: [String]) -> [String] {
    var result = arguments
    var saved: Int32?
    func stdoutCopy(for original: String) -> String {
      if saved == nil {
        fflush(standardOutput)
        saved = fcntl(1, F_DUPFD_CLOEXEC, 3)
        dup2(2, 1)
        reportOnStandardError = true
      }
      let copy = "/dev/fd/\(saved ?? 1)"
      typedNames[copy] = original
      return copy
    }
    // `-`, `/dev/stdout`, `/dev/fd/1`, and links that lead to them.
    func isStandardOutput(_ path: String) -> Bool { outputDescriptor(for: path) == 1 }
    for index in result.indices {
      let argument = result[index]
      if index > 0, outputFlags.contains(result[index - 1]), isStandardOutput(argument) {
        result[index] = stdoutCopy(for: argument)
      } else if let equals = argument.firstIndex(of: "="),
        outputFlags.contains(String(argument[..<equals])),
        isStandardOutput(String(argument[argument.index(after: equals)...]))
      {
        result[index] =
          String(argument[...equals])
          + stdoutCopy(for: String(argument[argument.index(after: equals)...]))
      }
    }
    return result
  }

  /// Whether the report goes to standard error because an output took standard output.
  nonisolated(unsafe) private(set) static var reportOnStandardError = false
  /// The paths typed for outputs that were rewritten to a descriptor, for messages.
  nonisolated(unsafe) private static var typedNames: [String: String] = [:]
  /// The descriptors open when the process started (`/dev/fd/N` may name only these).
  nonisolated(unsafe) private(set) static var initialDescriptors: Set<Int32> = [0, 1, 2]

  /// The path as the user typed it (a rewritten standard output shows as typed).
  static func typedName(_ path: String) -> String { typedNames[path] ?? path }

  /// Records the descriptors open now, before the process opens its own.
  static func recordInitialDescriptors() {
    guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")
    else { return }
    initialDescriptors = Set(names.compactMap { Int32($0) })
  }

  /// Writes one line to standard error; a closed or full standard error is ignored (there is no
  /// other place to report it).
  static func writeError(_ line: String) {
    let bytes = Array((line + "\n").utf8)
    bytes.withUnsafeBytes { buffer in
      var offset = 0
      while offset < buffer.count {
        let written = write(2, buffer.baseAddress! + offset, buffer.count - offset)
        if written < 0 && errno == EINTR { continue }
        if written <= 0 { return }
        offset += written
      }
    }
  }

  /// How writing the report to standard output ended.
  enum Ending: Equatable {
    case written
    /// The reader of a pipe left (EPIPE): end quietly with 128 + SIGPIPE, as a filter killed
    /// by the signal would.
    case readerLeft
    case failed(String)
  }

  /// Flushes standard output and says whether every write to it succeeded. When the report was
  /// moved to standard error (an output went to standard output), its failure is not an error,
  /// as no other failed write to standard error is.
  static func finishStandardOutput() -> Ending {
    if stdoutWasClosed { return .failed("cannot write the report: standard output is closed") }
    if fflush(standardOutput) != 0 || ferror(standardOutput) != 0 {
      let code = errno
      if reportOnStandardError { return .written }
      if code == EPIPE { return .readerLeft }
      return .failed(
        "cannot write the report to standard output: \(String(cString: strerror(code)))")
    }
    return .written
  }
}
