fn main() {
    std::process::exit(tarn::cli::main());
}
