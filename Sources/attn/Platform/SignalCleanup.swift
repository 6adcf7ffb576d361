import Foundation
import TensorIO

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files of outputs being written (the
/// targets stay as they were, or as complete new files: each rename is atomic), then exits with
/// 128 + the signal's number, as a shell reports a process killed by it.
///
/// The handlers are dispatch sources, which run on an ordinary thread and may take locks, not
/// in the signal's own context. `kill -9` cannot be handled: a `.NAME.tmp-PID-…` file being
/// written at that moment stays behind (docs/errors.md).
enum SignalCleanup {
  nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

  static func install() {
    // A reader that leaves a pipe makes writes fail with EPIPE instead of ending the process on
    // the spot, so that temporary files are removed as after any failed write
    // (StandardStreams turns a failed report on standard output into the shell's 141).
    signal(SIGPIPE, SIG_IGN)
    for number in [SIGINT, SIGTERM, SIGHUP] {
      // A signal the parent set to be ignored (nohup, a background job's SIGINT) stays ignored.
      var previous = sigaction()
      sigaction(number, nil, &previous)
      // SIG_IGN is the handler address 1.
      let ignored = previous.__sigaction_handler.sa_handler.map { unsafeBitCast($0, to: Int.self) }
      if ignored == 1 { continue }
      signal(number, SIG_IGN)
      let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
      source.setEventHandler {
        removeTemporaryFiles()
        _exit(128 + number)
      }
      source.resume()
      sources.append(source)
    }
  }
}
