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
/// created exclusively so two writers never share one), which is then renamed over the target with
/// rename(2), atomic within one file system. Keeping the temporary file in the same folder is what
/// keeps the rename on one file system. There is no fsync: this protects against a reader seeing
/// a half-written file and against a failed write destroying the old file, not against power loss.
///
/// Only a regular file (or nothing) is replaced: a path naming a folder, a device such as
/// `/dev/null`, a FIFO or a socket is refused before anything is written, since renaming over it
/// would replace the special file itself. A symbolic link to a regular file is replaced by the
/// new file; the file it pointed to is left as it was.
///
/// On any failure the temporary file is removed, the target is left as it was, and the error is
/// an `AttentionError.file` naming `path` (for example when the folder does not exist).
public func writeAtomically(_ bytes: [UInt8], to path: String) throws {
  try writeAtomically([(path: path, bytes: bytes)])
}

/// Writes several files as `writeAtomically(_:to:)` writes one, all or nothing as far as it can:
/// every target is checked and every temporary file written before the first rename, so a
/// missing folder, a full disk or a target that is not a regular file leaves all the targets as
/// they were. Only a rename failing midway (rare: the folders were writable a moment before) can
/// leave the earlier targets replaced and the later ones not.
public func writeAtomically(_ files: [(path: String, bytes: [UInt8])]) throws {
  for file in files { try checkReplaceable(file.path) }
  var staged: [(temporary: String, path: String)] = []
  defer { for file in staged { unlink(file.temporary) } }
  for file in files {
    staged.append((try writeTemporary(file.bytes, beside: file.path), file.path))
  }
  while let file = staged.first {
    guard rename(file.temporary, file.path) == 0 else {
      let code = errno
      throw AttentionError.file(
        path: file.path, message: "cannot replace the file with the new one: \(errorText(code))")
    }
    staged.removeFirst()
  }
}

/// Throws unless `path` names a regular file or nothing (see `writeAtomically`).
private func checkReplaceable(_ path: String) throws {
  let (_, name) = splitPath(path)
  guard !name.isEmpty, name != ".", name != ".." else {
    throw AttentionError.file(
      path: path, message: "cannot write: the path names a folder, not a file")
  }
  var info = stat()
  guard stat(path, &info) == 0 else { return }  // nothing there yet (or unreachable: found later)
  let kind: String
  switch info.st_mode & S_IFMT {
  case S_IFREG: return
  case S_IFDIR: kind = "a folder"
  case S_IFCHR, S_IFBLK: kind = "a device"
  case S_IFIFO: kind = "a FIFO"
  case S_IFSOCK: kind = "a socket"
  default: kind = "a special file"
  }
  throw AttentionError.file(
    path: path, message: "cannot write: it is \(kind), not a regular file")
}

/// Writes `bytes` to a new temporary file in the folder of `path` and returns its path; on
/// failure nothing is left behind.
private func writeTemporary(_ bytes: [UInt8], beside path: String) throws -> String {
  let (folder, name) = splitPath(path)
  let random = String(UInt64.random(in: 0...UInt64.max), radix: 16)
  let temporaryPath = (folder == "/" ? "" : folder) + "/." + name + ".tmp-\(getpid())-" + random

  let descriptor = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
  guard descriptor >= 0 else {
    let code = errno
    throw AttentionError.file(
      path: path, message: "cannot write: " + describeCreateError(code, folder))
  }

  // Write everything, retrying short writes and interruptions.
  var writeError: Int32 = 0
  bytes.withUnsafeBytes { buffer in
    var offset = 0
    while offset < buffer.count, let base = buffer.baseAddress {
      let written = write(descriptor, base + offset, buffer.count - offset)
      if written < 0 {
        if errno == EINTR { continue }
        writeError = errno
        return
      }
      // A regular file never takes zero bytes of a non-empty write; don't spin if one does.
      if written == 0 {
        writeError = EIO
        return
      }
      offset += written
    }
  }
  // close can report a deferred write error (NFS, full disk), so its result counts too.
  let closeResult = close(descriptor)
  if writeError == 0 && closeResult != 0 { writeError = errno }
  guard writeError == 0 else {
    unlink(temporaryPath)
    throw AttentionError.file(
      path: path, message: "cannot write the temporary file: \(errorText(writeError))")
  }
  return temporaryPath
}

/// Splits a path into its folder ("." when there is none) and its last component.
private func splitPath(_ path: String) -> (folder: String, name: String) {
  guard let slash = path.lastIndex(of: "/") else { return (".", path) }
  let name = String(path[path.index(after: slash)...])
  let folder = String(path[..<slash])
  return (folder.isEmpty ? "/" : folder, name)
}

private func describeCreateError(_ code: Int32, _ folder: String) -> String {
  switch code {
  case ENOENT: return "the folder \(quotedForMessage(folder)) does not exist"
  case ENOTDIR: return "\(quotedForMessage(folder)) is not a folder"
  default: return "cannot create a file in \(quotedForMessage(folder)): \(errorText(code))"
  }
}
