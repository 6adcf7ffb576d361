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
/// On any failure the temporary file is removed, the target is left as it was, and the error is
/// an `AttentionError.file` naming `path` (for example when the folder does not exist).
public func writeAtomically(_ bytes: [UInt8], to path: String) throws {
  let (folder, name) = splitPath(path)
  guard !name.isEmpty, name != ".", name != ".." else {
    throw AttentionError.file(
      path: path, message: "cannot write: the path names a folder, not a file")
  }
  let random = String(UInt64.random(in: 0...UInt64.max), radix: 16)
  let temporaryPath = (folder == "/" ? "" : folder) + "/." + name + ".tmp-\(getpid())-" + random

  let descriptor = open(temporaryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
  guard descriptor >= 0 else {
    let code = errno
    throw AttentionError.file(
      path: path, message: "cannot write: " + describeCreateError(code, folder))
  }

  var removeTemporary = true
  defer { if removeTemporary { unlink(temporaryPath) } }

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
    throw AttentionError.file(
      path: path, message: "cannot write the temporary file: \(errorText(writeError))")
  }

  guard rename(temporaryPath, path) == 0 else {
    let code = errno
    throw AttentionError.file(
      path: path, message: "cannot replace the file with the new one: \(errorText(code))")
  }
  removeTemporary = false
}

/// The whole content of the file at `path`, with errors as `AttentionError.file` naming it.
///
/// Reads until end of file rather than trusting the size `fstat` reports, which can change under
/// us or be zero for special files.
func readFileBytes(atPath path: String) throws -> [UInt8] {
  let descriptor = open(path, O_RDONLY | O_CLOEXEC)
  guard descriptor >= 0 else {
    let code = errno
    let message = code == ENOENT ? "no such file" : errorText(code)
    throw AttentionError.file(path: path, message: "cannot open: \(message)")
  }
  defer { close(descriptor) }

  var info = stat()
  if fstat(descriptor, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR {
    throw AttentionError.file(path: path, message: "cannot read: it is a folder, not a file")
  }
  var bytes: [UInt8] = []
  if info.st_size > 0 && info.st_size < Int.max { bytes.reserveCapacity(Int(info.st_size)) }
  var chunk = [UInt8](repeating: 0, count: 1 << 16)
  while true {
    let count = chunk.withUnsafeMutableBytes { buffer in
      read(descriptor, buffer.baseAddress, buffer.count)
    }
    if count < 0 {
      if errno == EINTR { continue }
      let code = errno
      throw AttentionError.file(path: path, message: "cannot read: \(errorText(code))")
    }
    if count == 0 { return bytes }
    bytes.append(contentsOf: chunk[0..<count])
  }
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

private func errorText(_ code: Int32) -> String {
  guard let text = strerror(code) else { return "error \(code)" }
  return String(cString: text)
}
