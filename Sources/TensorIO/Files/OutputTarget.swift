import Tensors

#if canImport(Glibc)
  import Glibc
#elseif canImport(Musl)
  import Musl
#elseif canImport(Darwin)
  import Darwin
#endif

/// What an output path names, decided before anything is written: a file to replace (or
/// create) through a temporary file and a rename, or a stream to write through — never a special
/// file renamed over.
enum OutputTarget: Equatable {
  /// A regular file, a new name in a folder, or a symbolic link to a regular file (the link is
  /// replaced by the new file, the file it pointed to is left as it was).
  case replace
  /// An open descriptor: `-` is standard output; `/dev/stdout`, `/dev/stderr`, `/dev/fd/N` and
  /// `/proc/self/fd/N` (also as the target of a symbolic link) are descriptors 1, 2 and `N`.
  /// Written as is: reopening them would start over at the beginning of whatever they are.
  case descriptor(Int32)
  /// A character device (`/dev/null`) or a FIFO, opened for writing and written through.
  case special

  init(path: String) throws {
    if let descriptor = Self.descriptor(named: path) {
      self = .descriptor(descriptor)
      return
    }
    let name = path.split(separator: "/", omittingEmptySubsequences: false).last ?? ""
    guard !name.isEmpty, name != ".", name != ".." else {
      throw AttentionError.file(
        path: path, message: "cannot write: the path names a folder, not a file")
    }
    let limit = pathconf(Self.folder(of: path), Int32(_PC_NAME_MAX))
    if limit > 0 && name.utf8.count > limit {
      throw AttentionError.file(
        path: path,
        message: "cannot write: the name is \(name.utf8.count) bytes, over the file system's "
          + "limit of \(limit)")
    }
    // A chain of symbolic links may end at a descriptor's name.
    var hop = path
    for _ in 0..<40 {
      guard let target = Self.linkTarget(hop) else { break }
      if let descriptor = Self.descriptor(named: target) {
        self = .descriptor(descriptor)
        return
      }
      hop = target.hasPrefix("/") ? target : Self.folder(of: hop) + "/" + target
    }
    var info = stat()
    guard stat(path, &info) == 0 else {
      self = .replace  // nothing there yet (or unreachable: writing says why)
      return
    }
    switch info.st_mode & S_IFMT {
    case S_IFREG: self = .replace
    case S_IFCHR, S_IFIFO: self = .special
    case S_IFDIR:
      throw AttentionError.file(path: path, message: "cannot write: it is a folder, not a file")
    case S_IFBLK:
      throw AttentionError.file(path: path, message: "cannot write: it is a block device")
    case S_IFSOCK:
      throw AttentionError.file(path: path, message: "cannot write: it is a socket")
    default:
      throw AttentionError.file(path: path, message: "cannot write: it is a special file")
    }
  }

  private static func descriptor(named path: String) -> Int32? {
    switch path {
    case "-", "/dev/stdout", "/proc/self/fd/1": return 1
    case "/dev/stderr", "/proc/self/fd/2": return 2
    default: break
    }
    for prefix in ["/dev/fd/", "/proc/self/fd/"] where path.hasPrefix(prefix) {
      if let number = Int32(path.dropFirst(prefix.count)), number >= 0 { return number }
    }
    return nil
  }

  private static func linkTarget(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let count = readlink(path, &buffer, buffer.count - 1)
    guard count > 0 else { return nil }
    return String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  static func folder(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let folder = String(path[..<slash])
    return folder.isEmpty ? "/" : folder
  }
}

/// The descriptor an output path writes to (`-`, `/dev/stdout`, `/dev/fd/N`, or a link leading
/// to one), or `nil` for a file, a device or a FIFO.
public func outputDescriptor(for path: String) -> Int32? {
  if case .descriptor(let number)? = try? OutputTarget(path: path) { return number }
  return nil
}

/// Writes all of `bytes` to `descriptor`, retrying short writes and interruptions; returns the
/// `errno` of a failure, 0 on success.
func writeAll(_ bytes: [UInt8], to descriptor: Int32) -> Int32 {
  bytes.withUnsafeBytes { buffer in
    var offset = 0
    while offset < buffer.count, let base = buffer.baseAddress {
      let written = write(descriptor, base + offset, buffer.count - offset)
      if written < 0 {
        if errno == EINTR { continue }
        return errno
      }
      // A file never takes zero bytes of a non-empty write; don't spin if one does.
      if written == 0 { return EIO }
      offset += written
    }
    return 0
  }
}
