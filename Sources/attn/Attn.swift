import ArgumentParser

@main
struct Attn: ParsableCommand {
  static let configuration = CommandConfiguration(
    commandName: "attn",
    abstract: "Attention from scratch on the CPU, on OpenBLAS.",
    subcommands: []
  )
}
