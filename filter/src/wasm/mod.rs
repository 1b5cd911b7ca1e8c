//! The proxy-wasm flavor's glue, only built for wasm32: the root context (the sync leader's
//! host, per-worker flushes) in `root`, the HTTP context in `request`, both through the
//! status-checked host calls of `calls`. Every host call's error is handled: a trapped VM
//! would answer 503 to everything until reloaded.

mod calls;
mod request;
mod root;
#[cfg(any(
    feature = "waterfall-return",
    feature = "waterfall-read",
    feature = "waterfall-hash",
    feature = "waterfall-lookup",
    feature = "waterfall-identity"
))]
mod waterfall;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::new())
    });
}}
