import Foundation
import TensorIO
import Tensors
import Testing
import _TestSupport

/// `writeAtomically` with several files (all staged before any is renamed) and with targets that
/// are not regular files, and reading special files.
@Suite("Atomic writes and special files")
struct AtomicFileTests {
  static func withFolder(_ body: (IOFixtures.ScratchFolder) throws -> Void) throws {
    let folder = try IOFixtures.ScratchFolder()
    defer { folder.remove() }
    try body(folder)
  }

  @Test("several files are written together")
  func several() throws {
    try Self.withFolder { folder in
      try writeAtomically([(folder.path("a"), [1, 2]), (folder.path("b"), [3])])
      #expect(try folder.contents() == ["a", "b"])
      #expect(try IOFixtures.ScratchFolder.bytes(folder.path("a")) == [1, 2])
      #expect(try IOFixtures.ScratchFolder.bytes(folder.path("b")) == [3])
    }
  }

  @Test("one file that cannot be written leaves all targets as they were, and no temporary")
  func allOrNothing() throws {
    try Self.withFolder { folder in
      try writeAtomically([(folder.path("a"), [9])])
      do {
        try writeAtomically([
          (folder.path("a"), [1]), (folder.path("b"), [2]), (folder.path("missing/c"), [3]),
        ])
        Issue.record("writing into a missing folder succeeded")
      } catch let error as AttentionError {
        #expect("\(error)".contains("missing/c"), "\(error)")
      }
      #expect(try folder.contents() == ["a"], "new or temporary files left behind")
      #expect(try IOFixtures.ScratchFolder.bytes(folder.path("a")) == [9], "a was replaced")
    }
  }

  /// A folder is refused; a character device and a FIFO are written through, never renamed
  /// over (a FIFO nobody reads is an error, not a hang); either way the special file is the same
  /// file afterwards, and nothing is left in the folder but the regular output.
  @Test(
    "a folder is refused; a device or a FIFO is written through, never replaced",
    arguments: ["folder", "device", "fifo", "fifo with a reader"])
  func notRegular(kind: String) throws {
    try Self.withFolder { folder in
      let target: String
      var reader: Int32 = -1
      defer { if reader >= 0 { close(reader) } }
      switch kind {
      case "folder":
        target = folder.path("sub")
        try FileManager.default.createDirectory(
          atPath: target, withIntermediateDirectories: false)
      case "device": target = "/dev/null"
      default:
        target = folder.path("pipe")
        try #require(mkfifo(target, 0o644) == 0)
        if kind == "fifo with a reader" { reader = open(target, O_RDONLY | O_NONBLOCK) }
      }
      var before = stat()
      try #require(stat(target, &before) == 0)
      do {
        try writeAtomically([(folder.path("ok"), [1]), (target, [1, 2, 3])])
        #expect(kind == "device" || kind == "fifo with a reader", "wrote to the \(kind)")
        if reader >= 0 {
          var bytes = [UInt8](repeating: 0, count: 8)
          #expect(read(reader, &bytes, 8) == 3 && Array(bytes[0..<3]) == [1, 2, 3])
        }
        #expect(try IOFixtures.ScratchFolder.bytes(folder.path("ok")) == [1])
      } catch let error as AttentionError {
        #expect(kind == "folder" || kind == "fifo", "\(kind): \(error)")
        #expect("\(error)".contains(kind == "fifo" ? "no reader" : "folder"), "\(error)")
        #expect(!FileManager.default.fileExists(atPath: folder.path("ok")), "ok was written")
      }
      var after = stat()
      try #require(stat(target, &after) == 0)
      #expect(after.st_mode == before.st_mode && after.st_ino == before.st_ino, "\(kind) changed")
      let left = try folder.contents().filter { !["sub", "pipe", "ok"].contains($0) }
      #expect(left.isEmpty, "left behind: \(left)")
    }
  }

  @Test("reading a device is refused rather than read forever")
  func readDevice() throws {
    let error = IOFixtures.fileError { _ = try NPY.read(contentsOf: "/dev/zero") }
    #expect(error?.message.contains("device") == true, "\(error?.message ?? "no error")")
  }

  /// A sparse file takes no disk space, so this costs nothing where the file system has them: a
  /// valid header whose data (larger than the machine's memory) is all holes. The reader refuses
  /// it from the header, before allocating or reading any data.
  @Test("a file larger than the machine's memory is refused before it is read")
  func largerThanMemory() throws {
    try Self.withFolder { folder in
      let path = folder.path("huge.npy")
      let elements = (ProcessInfo.processInfo.physicalMemory + (1 << 30)) / 4
      let header = NPYTests.handWritten(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (\(elements),), }", data: [])
      #expect(FileManager.default.createFile(atPath: path, contents: Data(header)))
      let descriptor = open(path, O_WRONLY)
      try #require(descriptor >= 0)
      defer { close(descriptor) }
      try #require(
        ftruncate(descriptor, off_t(header.count) + off_t(elements) * 4) == 0,
        "no sparse files here")
      do {
        _ = try NPY.read(contentsOf: path)
        Issue.record("a file larger than memory was read")
      } catch AttentionError.memoryBudget(let exceeded) {
        #expect(exceeded.what.contains("huge.npy"), "\(exceeded)")
        #expect(exceeded.neededBytes == Int(elements) * 4)
      }
    }
  }

  @Test("a symbolic link to a regular file is replaced; the file it named stays as it was")
  func symlinkTarget() throws {
    try Self.withFolder { folder in
      try writeAtomically([(folder.path("real"), [7])])
      try FileManager.default.createSymbolicLink(
        atPath: folder.path("link"), withDestinationPath: "real")
      try writeAtomically([(folder.path("link"), [8])])
      #expect(try IOFixtures.ScratchFolder.bytes(folder.path("real")) == [7])
      #expect(try IOFixtures.ScratchFolder.bytes(folder.path("link")) == [8])
    }
  }
}

extension IOFixtures.ScratchFolder {
  static func bytes(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
  }
}
