mod options;

fn main() {}
