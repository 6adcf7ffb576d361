import Synchronization

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// The temporary files `writeAtomically` has created and not yet renamed or removed, so that a
/// program interrupted while it writes can remove them (`removeTemporaryFiles()`).
enum TemporaryFiles {
  private struct State {
    var paths: Set<String> = []
    /// Set by `removeAll`: the process is ending, and no new temporary file may appear.
    var closed = false
  }

  private static let state = Mutex(State())

  /// Creates the temporary file `path` (exclusively, for writing) and registers it, both under
  /// the lock, so that `removeAll` sees every file that exists. Returns the descriptor, or −1
  /// with `errno` set (`EINTR` once the process is ending).
  static func create(_ path: String) -> Int32 {
    state.withLock { state -> Int32 in
      guard !state.closed else {
        errno = EINTR
        return -1
      }
      let descriptor = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
      if descriptor >= 0 { state.paths.insert(path) }
      return descriptor
    }
  }

  static func forget(_ path: String) { state.withLock { _ = $0.paths.remove(path) } }

  /// Removes and forgets every registered temporary file; none can be created afterwards.
  static func removeAll() {
    state.withLock { state in
      for path in state.paths { unlink(path) }
      state.paths.removeAll()
      state.closed = true
    }
  }
}

/// Removes every temporary file that `writeAtomically` has open at this moment, for a program
/// ending on a signal (SIGINT, SIGTERM, SIGHUP) while it writes its outputs: call it from the
/// signal's handler (a dispatch source, not an async-signal context: it takes a lock), then exit.
/// The targets are left as they were before the interrupted write or as it left them: each
/// rename is atomic. After `kill -9` nothing runs, and a hidden `.NAME.tmp-PID-…` file may stay.
public func removeTemporaryFiles() {
  TemporaryFiles.removeAll()
}
