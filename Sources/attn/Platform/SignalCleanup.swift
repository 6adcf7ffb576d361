import Foundation
import Synchronization
import TensorIO

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files of outputs being written, then exits
/// with 128 + the signal's number, as a shell reports a process killed by it — leaving the
/// outputs of the run as a set either all as they were or all new, never some of each.
///
/// The handlers are dispatch sources, which run on an ordinary thread beside the main thread and
/// may take locks, not in the signal's own context. While `writingOutputs` writes a set of outputs
/// (`writeAtomically`, which renames the staged files over the targets while it holds an
/// exclusive flock on each target's folder), the handler first takes the same folder locks
/// through descriptors of its own — flock locks of one process conflict across open file
/// descriptions — so it can never run between two renames:
/// - a signal before the renames start takes the locks first: the temporary files are removed
///   and the main thread, which would wait for the locks, never renames anything (all old);
/// - a signal during the renames waits for the last of them (all new), then exits;
/// - the main thread, back from a write that failed because the handler removed its files,
///   waits on the handler's lock instead of reporting that failure: the run ends with 128 + n.
/// A folder that cannot be opened for reading is not locked (by either side), and over NFS flock
/// is per process: there a signal can still fall between two renames. `kill -9` cannot be
/// handled: a `.NAME.tmp-PID-…` file being written at that moment stays behind, and one between
/// two renames leaves the set mixed (docs/errors.md).
enum SignalCleanup {
  nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

  /// The folders of the output set being written (sorted, as `writeAtomically` locks them), or
  /// empty; held by a handler from the moment it starts ending the process.
  private static let writing = Mutex<[String]>([])

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
      source.setEventHandler { end(by: number) }
      source.resume()
      sources.append(source)
    }
  }

  /// Runs `body`, which writes one set of outputs with `writeAtomically` into files in `folders`,
  /// so that a signal leaves the set all old or all new (see the type's comment). Returns or
  /// throws what `body` does — unless a signal is ending the process, which then never returns.
  static func writingOutputs<T>(in folders: Set<String>, _ body: () throws -> T) throws -> T {
    writing.withLock { $0 = folders.sorted() }
    defer { writing.withLock { $0 = [] } }
    return try body()
  }

  /// The handler: waits for a set's renames in progress, removes the temporary files, exits.
  private static func end(by number: Int32) {
    writing.withLock { folders in
      for folder in folders {
        let descriptor = open(folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard descriptor >= 0 else { continue }
        while flock(descriptor, LOCK_EX) != 0 && errno == EINTR {}
        // Held until the process ends.
      }
      removeTemporaryFiles()
      _exit(128 + number)
    }
  }
}
