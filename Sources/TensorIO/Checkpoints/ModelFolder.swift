import Foundation
import Tensors

/// A Hugging Face checkpoint folder as `save_pretrained` writes it: `config.json` and the weights,
/// one `model.safetensors` or shards listed by `model.safetensors.index.json`'s `weight_map`.
///
/// Opening the folder reads the config and every file's header (the shards' headers only when
/// there is no index), never a tensor's bytes; `read(names:)` then opens only the shards that
/// hold the names asked for and reads only those tensors.
public struct ModelFolder: Sendable {
  public let path: String
  /// `config.json`'s bytes.
  public let config: Data
  /// Every tensor name, and the file (inside the folder) that holds it.
  public let files: [String: String]

  public static let indexName = "model.safetensors.index.json"
  public static let singleName = "model.safetensors"

  public init(path: String) throws {
    self.path = path
    var isFolder: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isFolder), isFolder.boolValue
    else {
      throw AttentionError.file(
        path: path, message: "is not a folder (--model takes a model's folder)")
    }
    let configPath = (path as NSString).appendingPathComponent("config.json")
    guard let config = FileManager.default.contents(atPath: configPath) else {
      throw AttentionError.file(path: configPath, message: "is missing or unreadable")
    }
    self.config = config
    let index = (path as NSString).appendingPathComponent(Self.indexName)
    if let data = FileManager.default.contents(atPath: index) {
      files = try Self.weightMap(data, path: index)
    } else {
      let single = (path as NSString).appendingPathComponent(Self.singleName)
      guard FileManager.default.fileExists(atPath: single) else {
        throw AttentionError.file(
          path: path, message: "holds neither \(Self.singleName) nor \(Self.indexName)")
      }
      let header = try SafeTensors.read(contentsOf: single) { _ in false }
      files = Dictionary(uniqueKeysWithValues: header.skippedNames.map { ($0, Self.singleName) })
    }
  }

  /// Every tensor name, sorted.
  public var names: [String] { files.keys.sorted() }

  /// The tensors called `names`, each read from its file (only those files are opened, and in
  /// them only those tensors' bytes); `maxBytes` bounds their float32 bytes in all.
  public func read(names: [String], maxBytes: Int? = nil) throws -> SafeTensorsFile {
    var byFile: [String: Set<String>] = [:]
    for name in names {
      guard let file = files[name] else {
        throw AttentionError.file(path: path, message: "holds no tensor \(quotedForMessage(name))")
      }
      byFile[file, default: []].insert(name)
    }
    var result = SafeTensorsFile(tensors: [:], dtypes: [:], source: path)
    var budget = maxBytes
    for (file, wanted) in byFile.sorted(by: { $0.key < $1.key }) {
      let shard = try SafeTensors.read(
        contentsOf: (path as NSString).appendingPathComponent(file), maxBytes: budget
      ) { wanted.contains($0) }
      for name in wanted {
        guard let tensor = shard.tensors[name] else {
          throw AttentionError.file(
            path: (path as NSString).appendingPathComponent(file),
            message: "holds no tensor \(quotedForMessage(name)) (the index says it does)")
        }
        result.tensors[name] = tensor
        result.dtypes[name] = shard.dtypes[name]
        budget = budget.map { $0 - tensor.count * MemoryLayout<Float>.stride }
      }
    }
    return result
  }

  /// `weight_map` of an index file: name → shard file name.
  private static func weightMap(_ data: Data, path: String) throws -> [String: String] {
    struct Index: Decodable { var weight_map: [String: String] }
    do {
      let map = try JSONDecoder().decode(Index.self, from: data).weight_map
      if let bad = map.values.first(where: { $0.contains("/") || $0.hasPrefix(".") }) {
        throw AttentionError.file(path: path, message: "names a shard outside the folder: \(bad)")
      }
      return map
    } catch let error as AttentionError {
      throw error
    } catch {
      throw AttentionError.file(
        path: path, message: "is not an index: no weight_map of names to files")
    }
  }
}
