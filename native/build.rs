//! Immediate binding: every callback the module calls is resolved when Envoy loads it, so an
//! Envoy that lacks one refuses the module with its `dlopen` error instead of the process
//! dying on the first request that calls it. (rustc's full RELRO already asks for this on
//! Linux; saying it here keeps it whatever RUSTFLAGS or a profile change.)

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,now");
    }
}
