fn main() {
    println!("ferrotune");
}
