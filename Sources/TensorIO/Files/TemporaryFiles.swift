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
  private static let paths = Mutex<Set<String>>([])

  static func add(_ path: String) { paths.withLock { _ = $0.insert(path) } }

  static func forget(_ path: String) { paths.withLock { _ = $0.remove(path) } }

  /// Removes and forgets every registered temporary file.
  static func removeAll() {
    paths.withLock { paths in
      for path in paths { unlink(path) }
      paths.removeAll()
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
