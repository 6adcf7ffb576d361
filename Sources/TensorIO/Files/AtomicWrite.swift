import Tensors

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// Writes `bytes` to `path` so that readers see either the old file or the complete new one.
///
/// The bytes go to a temporary file in the target's folder (named `.<name>.tmp-<pid>-<random>`,
/// the name shortened to fit the file system's limit; created exclusively so two writers never
/// share one), which is then renamed over the target with rename(2), atomic within one file
/// system. Keeping the temporary file in the same folder is what keeps the rename on one file
/// system. An existing file's permission bits (and owner, where the process may set it) pass to
/// the new one. There is no fsync: this protects against a reader seeing a half-written file and
/// against a failed write destroying the old file, not against power loss.
///
/// Paths that are not files to replace are written through instead (`OutputTarget`): `-` and
/// `/dev/stdout` (standard output), `/dev/stderr`, `/dev/fd/N`, a character device such as
/// `/dev/null`, a FIFO. A folder, a block device and a socket are refused before anything is
/// written. A symbolic link to a regular file is replaced by the new file; the file it pointed
/// to is left as it was.
///
/// On any failure the temporary file is removed, the target is left as it was, and the error is
/// an `AttentionError.file` naming `path` (for example when the folder does not exist).
public func writeAtomically(_ bytes: [UInt8], to path: String) throws {
  try writeAtomically([(path: path, bytes: bytes)])
}

/// Writes several files as `writeAtomically(_:to:)` writes one, as a set: every target is
/// checked and every temporary file written before the first rename, so a missing folder, a full
/// disk or a target that cannot be written leaves all the targets as they were; streams are
/// written next; then the renames run while this process holds an exclusive advisory lock
/// (flock) on each target folder, so that concurrent writers using this function replace the
/// set one after the other, never interleaved. Only a rename failing midway (rare: the folders
/// were writable a moment before) can leave the earlier targets replaced and the later ones not.
public func writeAtomically(_ files: [(path: String, bytes: [UInt8])]) throws {
  let targets = try files.map { try OutputTarget(path: $0.path) }
  var staged: [(temporary: String, path: String)] = []
  defer {
    for file in staged {
      unlink(file.temporary)
      TemporaryFiles.forget(file.temporary)
    }
  }
  for (file, target) in zip(files, targets) where target == .replace {
    staged.append((try writeTemporary(file.bytes, beside: file.path), file.path))
  }
  for (file, target) in zip(files, targets) where target != .replace {
    try writeThrough(file.bytes, to: file.path, target: target)
  }
  try withFolderLocks(Set(staged.map { OutputTarget.folder(of: $0.path) })) {
    while let file = staged.first {
      guard rename(file.temporary, file.path) == 0 else {
        let code = errno
        throw AttentionError.file(
          path: file.path, message: "cannot replace the file with the new one: \(errorText(code))")
      }
      TemporaryFiles.forget(file.temporary)
      staged.removeFirst()
    }
  }
}

/// Writes `bytes` to a stream target: its descriptor, or the special file opened for writing.
private func writeThrough(_ bytes: [UInt8], to path: String, target: OutputTarget) throws {
  var descriptor: Int32
  switch target {
  case .descriptor(let number): descriptor = number
  case .special:
    // Non-blocking, so that a FIFO nobody reads is an error rather than a hang.
    descriptor = open(path, O_WRONLY | O_CLOEXEC | O_NONBLOCK)
    guard descriptor >= 0 else {
      let code = errno
      let reason = code == ENXIO ? "a FIFO with no reader" : errorText(code)
      throw AttentionError.file(path: path, message: "cannot open for writing: \(reason)")
    }
    _ = fcntl(descriptor, F_SETFL, fcntl(descriptor, F_GETFL) & ~O_NONBLOCK)
  case .replace: preconditionFailure("a file to replace is not written through")
  }
  defer { if case .special = target { close(descriptor) } }
  let code = writeAll(bytes, to: descriptor)
  guard code == 0 else {
    throw AttentionError.file(path: path, message: "cannot write: \(errorText(code))")
  }
}

/// Runs `body` holding an exclusive flock on each folder, taken in sorted order so that two
/// writers never wait for each other in a cycle.
private func withFolderLocks(_ folders: Set<String>, _ body: () throws -> Void) throws {
  var held: [Int32] = []
  defer {
    for descriptor in held {
      flock(descriptor, LOCK_UN)
      close(descriptor)
    }
  }
  for folder in folders.sorted() {
    let descriptor = open(folder, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    // A folder that cannot be opened for reading is still written to; it is just not locked.
    guard descriptor >= 0 else { continue }
    held.append(descriptor)
    while flock(descriptor, LOCK_EX) != 0 && errno == EINTR {}
  }
  try body()
}

/// Writes `bytes` to a new temporary file in the folder of `path` and returns its path; on
/// failure nothing is left behind.
private func writeTemporary(_ bytes: [UInt8], beside path: String) throws -> String {
  let folder = OutputTarget.folder(of: path)
  let name = String(path.split(separator: "/", omittingEmptySubsequences: false).last ?? "")
  let temporaryPath =
    (folder == "/" ? "" : folder) + "/" + temporaryName(for: name, folder: folder)
  // Created and registered at once, so that a signal's cleanup finds every file that exists.
  let descriptor = TemporaryFiles.create(temporaryPath)
  guard descriptor >= 0 else {
    let code = errno
    throw AttentionError.file(
      path: path, message: "cannot write: " + describeCreateError(code, folder))
  }
  keepPermissions(of: path, on: descriptor)
  var writeError = writeAll(bytes, to: descriptor)
  // close can report a deferred write error (NFS, full disk), so its result counts too.
  let closeResult = close(descriptor)
  if writeError == 0 && closeResult != 0 { writeError = errno }
  guard writeError == 0 else {
    unlink(temporaryPath)
    TemporaryFiles.forget(temporaryPath)
    throw AttentionError.file(
      path: path, message: "cannot write the temporary file: \(errorText(writeError))")
  }
  return temporaryPath
}

/// `.NAME.tmp-PID-RANDOM`, with `NAME` cut (at a character boundary) so that the whole fits the
/// folder's name limit (255 bytes on most file systems) for any valid target name.
private func temporaryName(for name: String, folder: String) -> String {
  let random = String(UInt64.random(in: 0...UInt64.max), radix: 16)
  let suffix = ".tmp-\(getpid())-" + random
  let limit = pathconf(folder, Int32(_PC_NAME_MAX))
  let maxBytes = (limit > 0 ? limit : 255) - 1 - suffix.utf8.count
  var kept = ""
  for character in name {
    if kept.utf8.count + String(character).utf8.count > maxBytes { break }
    kept.append(character)
  }
  return "." + kept + suffix
}

/// Gives the new file at `descriptor` the permission bits, and where allowed the owner, of the
/// file `path` names now (a link's target); nothing when there is none.
private func keepPermissions(of path: String, on descriptor: Int32) {
  var info = stat()
  guard stat(path, &info) == 0, info.st_mode & S_IFMT == S_IFREG else { return }
  fchmod(descriptor, info.st_mode & 0o7777)
  if info.st_uid != geteuid() || info.st_gid != getegid() {
    // Permitted for root, and for a group the user belongs to; otherwise the file becomes the
    // user's, as any new file would.
    _ = fchown(descriptor, info.st_uid, info.st_gid)
    fchmod(descriptor, info.st_mode & 0o7777)  // chown clears set-id bits
  }
}

private func describeCreateError(_ code: Int32, _ folder: String) -> String {
  switch code {
  case ENOENT: return "the folder \(quotedForMessage(folder)) does not exist"
  case ENOTDIR: return "\(quotedForMessage(folder)) is not a folder"
  default: return "cannot create a file in \(quotedForMessage(folder)): \(errorText(code))"
  }
}
