import Foundation
import Tensors

/// A Hugging Face `config.json`, read as the attention layers need it: typed fields, each error
/// naming the field (`config.json: num_attention_heads must be an integer, got "8"`).
public struct ModelConfig: Sendable {
  /// `model_type`.
  public let modelType: String
  let fields: [String: ConfigValue]
  /// Where these fields sit in the file, for messages: "" or "rope_parameters.".
  let path: String

  /// Parses `config.json`'s bytes.
  public init(json: Data) throws {
    let value: ConfigValue
    do {
      value = try JSONDecoder().decode(ConfigValue.self, from: json)
    } catch {
      throw AttentionError.invalidArgument("config.json is not valid JSON")
    }
    guard case .object(let fields) = value else {
      throw AttentionError.invalidArgument("config.json must hold a JSON object")
    }
    self.init(fields: fields)
    _ = try string("model_type")
  }

  init(fields: [String: ConfigValue], path: String = "") {
    self.fields = fields
    self.path = path
    if case .string(let type) = fields["model_type"] { modelType = type } else { modelType = "" }
  }

  /// The nested config under `key` (Gemma 3's `text_config`), `nil` when absent.
  func nested(_ key: String) throws -> ModelConfig? {
    switch fields[key] {
    case nil, .null: return nil
    case .object(let inner): return ModelConfig(fields: inner, path: path + key + ".")
    default: throw wrongType(key, "an object")
    }
  }

  func has(_ key: String) -> Bool {
    if case .some(.null) = fields[key] { return false }
    return fields[key] != nil
  }

  func int(_ key: String) throws -> Int? {
    switch fields[key] {
    case nil, .null: return nil
    case .number(let x) where x == x.rounded() && abs(x) < 0x1p53: return Int(x)
    default: throw wrongType(key, "an integer")
    }
  }

  func double(_ key: String) throws -> Double? {
    switch fields[key] {
    case nil, .null: return nil
    case .number(let x): return x
    default: throw wrongType(key, "a number")
    }
  }

  func bool(_ key: String) throws -> Bool? {
    switch fields[key] {
    case nil, .null: return nil
    case .bool(let b): return b
    default: throw wrongType(key, "true or false")
    }
  }

  func string(_ key: String) throws -> String? {
    switch fields[key] {
    case nil, .null: return nil
    case .string(let s): return s
    default: throw wrongType(key, "a string")
    }
  }

  func strings(_ key: String) throws -> [String]? {
    switch fields[key] {
    case nil, .null: return nil
    case .array(let items):
      return try items.map {
        guard case .string(let s) = $0 else { throw wrongType(key, "a list of strings") }
        return s
      }
    default: throw wrongType(key, "a list of strings")
    }
  }

  /// A required integer, at least `minimum`.
  func required(_ key: String, _ fallback: String? = nil, minimum: Int = 1) throws -> Int {
    guard let value = try int(key) ?? fallback.flatMap({ try? int($0) }) else {
      throw AttentionError.invalidArgument(
        "config.json has no \(path)\(key)\(fallback.map { " (nor \(path)\($0))" } ?? "")")
    }
    guard value >= minimum else {
      throw AttentionError.invalidArgument(
        "config.json: \(path)\(key) must be ≥ \(minimum), got \(value)")
    }
    return value
  }

  /// The keys present (not null).
  var keys: [String] { fields.keys.filter { has($0) }.sorted() }

  func wrongType(_ key: String, _ expected: String) -> AttentionError {
    AttentionError.invalidArgument("config.json: \(path)\(key) must be \(expected)")
  }

  /// A config field whose value changes the attention in a way `attn` does not implement.
  func unsupported(_ key: String, _ value: String) -> AttentionError {
    AttentionError.invalidArgument(
      "config.json: \(path)\(key) = \(value) changes the attention and is not supported")
  }
}

/// A JSON value.
enum ConfigValue: Sendable, Decodable {
  case null
  case bool(Bool)
  case number(Double)
  case string(String)
  case array([ConfigValue])
  case object([String: ConfigValue])

  init(from decoder: Decoder) throws {
    let container = try decoder.singleValueContainer()
    if container.decodeNil() {
      self = .null
    } else if let b = try? container.decode(Bool.self) {
      self = .bool(b)
    } else if let x = try? container.decode(Double.self) {
      self = .number(x)
    } else if let s = try? container.decode(String.self) {
      self = .string(s)
    } else if let a = try? container.decode([ConfigValue].self) {
      self = .array(a)
    } else {
      self = .object(try container.decode([String: ConfigValue].self))
    }
  }
}
