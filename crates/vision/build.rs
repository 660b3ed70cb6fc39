fn main() {
    rsb_torch_link::emit();
}
