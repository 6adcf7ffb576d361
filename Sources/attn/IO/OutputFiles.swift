import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TensorIO

/// Writes a command's outputs only when all of them can be written: every file is encoded and
/// staged before any is renamed into place (see `writeAtomically`), so a missing folder or a path
/// naming a folder fails the run with every existing file as it was. `nil` paths are skipped.
/// A signal (SIGINT, SIGTERM, SIGHUP) leaves the files all as they were or all new, never some of
/// each (`SignalCleanup.writingOutputs`).
func writeOutputs(_ files: [(path: String?, bytes: () throws -> [UInt8])]) throws {
  var staged: [(path: String, bytes: [UInt8])] = []
  for file in files {
    guard let path = file.path else { continue }
    staged.append((path, try file.bytes()))
  }
  // The folders writeAtomically locks while it renames: those of the files it replaces (a
  // descriptor such as `-` is written through; a device or FIFO's folder is locked for nothing).
  let folders = Set(staged.map(\.path).filter { outputDescriptor(for: $0) == nil }.map(folder))
  try SignalCleanup.writingOutputs(in: folders) { try writeAtomically(staged) }
}

/// The folder `writeAtomically` stages `path`'s temporary file in and locks: the path up to its
/// last `/` (`.` when there is none).
private func folder(of path: String) -> String {
  guard let slash = path.lastIndex(of: "/") else { return "." }
  let folder = String(path[..<slash])
  return folder.isEmpty ? "/" : folder
}

/// Refuses an output path that is also an input path (a usage error, exit 64): a run must never
/// overwrite what it reads. Paths are compared after resolving `.`, `..` and symbolic links, and
/// existing files also by device and inode, so another spelling or a hard link is caught too.
/// Also refuses `/dev/fd/N` for a descriptor the shell did not hand over (`attn`'s own).
func checkOutputs(_ outputs: [String?], against inputs: [String?]) throws {
  // A tensor inside a safetensors file (`FILE.safetensors:NAME`) is its file.
  let inputs = inputs.compactMap { $0 }.map { InputFiles.safetensorsAddress($0)?.file ?? $0 }
  let inputPaths = Set(inputs.map(canonicalPath))
  let inputFiles = Set(inputs.compactMap(fileIdentity))
  var seen = Set<String>()
  for path in outputs.compactMap({ $0 }) {
    let typed = StandardStreams.typedName(path)
    let canonical = canonicalPath(path)
    if inputPaths.contains(canonical) || fileIdentity(path).map(inputFiles.contains) == true {
      throw ValidationError("output \(typed) is also an input; choose another path")
    }
    if !seen.insert(canonical).inserted {
      throw ValidationError("\(typed) is named as two outputs")
    }
    if typed == path, let descriptor = outputDescriptor(for: path),
      !StandardStreams.initialDescriptors.contains(descriptor)
    {
      throw ValidationError(
        "\(path): descriptor \(descriptor) was not open when attn started (give the shell's "
          + "redirection, such as 3>file, to write to it)")
    }
  }
}

private func canonicalPath(_ path: String) -> String {
  URL(fileURLWithPath: path).standardizedFileURL.resolvingSymlinksInPath().path
}

/// The device and inode of the file at `path` (links followed), or nil when there is none.
private func fileIdentity(_ path: String) -> [UInt64]? {
  var info = stat()
  guard stat(path, &info) == 0 else { return nil }
  return [UInt64(info.st_dev), UInt64(info.st_ino)]
}

/// Fails early — before minutes of work — when `path` cannot be written: it is a folder, or its
/// folder does not exist. (The write itself still goes through a temporary file and a rename.)
func checkWritable(_ path: String) throws {
  var isFolder: ObjCBool = false
  if FileManager.default.fileExists(atPath: path, isDirectory: &isFolder), isFolder.boolValue {
    throw AttentionError.file(path: path, message: "cannot write: it is a folder, not a file")
  }
  let folder = URL(fileURLWithPath: path).deletingLastPathComponent().path
  guard FileManager.default.fileExists(atPath: folder, isDirectory: &isFolder) else {
    throw AttentionError.file(
      path: path, message: "cannot write: the folder \(folder) does not exist")
  }
  guard isFolder.boolValue else {
    throw AttentionError.file(path: path, message: "cannot write: \(folder) is not a folder")
  }
}
