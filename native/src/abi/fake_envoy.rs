//! A fake Envoy for tests: the callbacks the module calls, defined in the test binary under
//! the names Envoy exports, over in-memory header maps, stats and callouts. With it the real
//! event hooks run natively, and a counting allocator can tell what the module allocates
//! (Envoy's own work inside a callback is not counted).

use super::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};

thread_local! {
    static IN_ENVOY: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    static LOGS: RefCell<Vec<(u32, String)>> = const { RefCell::new(Vec::new()) };
}

/// Counts the current thread's allocations made outside the fake Envoy's callbacks.
struct Counting;

// SAFETY: forwards to the system allocator; the bookkeeping touches only const-initialised
// thread-locals without destructors (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count_allocation() {
    let _ = IN_ENVOY.try_with(|inside| {
        if !inside.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations the module made on this thread while `f` ran.
pub fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// Runs the body of a fake callback: what Envoy allocates is Envoy's business.
fn envoy<R>(f: impl FnOnce() -> R) -> R {
    let was = IN_ENVOY.with(|i| i.replace(true));
    let r = f();
    IN_ENVOY.with(|i| i.set(was));
    r
}

pub fn logs() -> Vec<(u32, String)> {
    LOGS.with(|l| l.borrow().clone())
}

/// Borrows a module buffer.
///
/// # Safety
/// As for [`envoy_bytes`].
unsafe fn module_bytes<'a>(b: ModuleBuffer) -> Option<&'a [u8]> {
    // SAFETY: the module lends valid buffers for the call.
    (!b.ptr.is_null()).then(|| unsafe { envoy_bytes(b.ptr, b.len) })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub id: u64,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// Envoy's configuration object.
#[derive(Default)]
pub struct FakeConfig {
    pub counters: RefCell<Vec<(String, u64)>>,
    pub gauges: RefCell<Vec<(String, u64)>>,
    pub callouts: RefCell<Vec<Callout>>,
}

impl FakeConfig {
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
    pub fn gauge(&self, name: &str) -> u64 {
        self.gauges
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }
    pub fn ptr(&self) -> *mut c_void {
        self as *const FakeConfig as *mut c_void
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// False for headers sent by the module itself (`send_response_headers`), true for
    /// Envoy's local reply.
    pub local_reply: bool,
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub details: String,
}

/// Envoy's per-stream filter object.
#[derive(Default)]
pub struct FakeFilter {
    pub request: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
    pub response: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
    pub sent: RefCell<Option<Sent>>,
    pub worker: u32,
}

impl FakeFilter {
    pub fn with(headers: &[(&str, &str)]) -> FakeFilter {
        FakeFilter {
            request: RefCell::new(
                headers
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect(),
            ),
            ..FakeFilter::default()
        }
    }
    pub fn request_header(&self, name: &str) -> Vec<String> {
        self.request
            .borrow()
            .iter()
            .filter(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response
            .borrow()
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
    pub fn ptr(&self) -> *mut c_void {
        self as *const FakeFilter as *mut c_void
    }
}

/// # Safety
/// `p` is a `FakeConfig` the test owns.
unsafe fn config<'a>(p: *mut c_void) -> &'a FakeConfig {
    // SAFETY: the caller's contract.
    unsafe { &*(p as *const FakeConfig) }
}

/// # Safety
/// `p` is a `FakeFilter` the test owns.
unsafe fn filter<'a>(p: *mut c_void) -> &'a FakeFilter {
    // SAFETY: the caller's contract.
    unsafe { &*(p as *const FakeFilter) }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer) {
    envoy(|| {
        // SAFETY: the module lends the message for the call.
        let m = unsafe { module_bytes(message) }.unwrap_or_default();
        LOGS.with(|l| l.borrow_mut().push((level, text(m))));
    })
}

/// Always: the tests tick the leader themselves, no tick thread is started.
#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_is_validation_mode() -> bool {
    true
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_get_concurrency() -> u32 {
    2
}

fn define(list: &RefCell<Vec<(String, u64)>>, name: ModuleBuffer, id_out: *mut usize) -> u32 {
    envoy(|| {
        // SAFETY: the module lends the name for the call and its out-pointer.
        let name = text(unsafe { module_bytes(name) }.unwrap_or_default());
        let mut list = list.borrow_mut();
        list.push((name, 0));
        // SAFETY: as above.
        unsafe { *id_out = list.len() - 1 };
        METRICS_SUCCESS
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_counter(
    config_envoy: *mut c_void,
    name: ModuleBuffer,
    _label_names: *const ModuleBuffer,
    _label_names_len: usize,
    id_out: *mut usize,
) -> u32 {
    // SAFETY: the tests pass their FakeConfig.
    define(&unsafe { config(config_envoy) }.counters, name, id_out)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
    config_envoy: *mut c_void,
    name: ModuleBuffer,
    _label_names: *const ModuleBuffer,
    _label_names_len: usize,
    id_out: *mut usize,
) -> u32 {
    // SAFETY: the tests pass their FakeConfig.
    define(&unsafe { config(config_envoy) }.gauges, name, id_out)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
    config_envoy: *mut c_void,
    id: usize,
    _label_values: *const ModuleBuffer,
    _label_values_len: usize,
    value: u64,
) -> u32 {
    envoy(|| {
        // SAFETY: the tests pass their FakeConfig.
        match unsafe { config(config_envoy) }
            .counters
            .borrow_mut()
            .get_mut(id)
        {
            Some((_, v)) => {
                *v += value;
                METRICS_SUCCESS
            }
            None => 1,
        }
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
    config_envoy: *mut c_void,
    id: usize,
    _label_values: *const ModuleBuffer,
    _label_values_len: usize,
    value: u64,
) -> u32 {
    envoy(|| {
        // SAFETY: the tests pass their FakeConfig.
        match unsafe { config(config_envoy) }
            .gauges
            .borrow_mut()
            .get_mut(id)
        {
            Some((_, v)) => {
                *v = value;
                METRICS_SUCCESS
            }
            None => 1,
        }
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_http_callout(
    config_envoy: *mut c_void,
    callout_id_out: *mut u64,
    cluster: ModuleBuffer,
    headers: *const ModuleHeader,
    headers_len: usize,
    body: ModuleBuffer,
    timeout_ms: u64,
) -> u32 {
    envoy(|| {
        // SAFETY: the tests pass their FakeConfig; the module lends the rest for the call.
        unsafe {
            let c = config(config_envoy);
            let headers: Vec<(String, String)> = std::slice::from_raw_parts(headers, headers_len)
                .iter()
                .map(|h| {
                    (
                        text(envoy_bytes(h.key_ptr, h.key_len)),
                        text(envoy_bytes(h.value_ptr, h.value_len)),
                    )
                })
                .collect();
            let mut callouts = c.callouts.borrow_mut();
            let id = callouts.len() as u64 + 100;
            callouts.push(Callout {
                id,
                cluster: text(module_bytes(cluster).unwrap_or_default()),
                headers,
                body: module_bytes(body).unwrap_or_default().to_vec(),
                timeout_ms,
            });
            *callout_id_out = id;
        }
        CALLOUT_INIT_SUCCESS
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
    _config_envoy: *mut c_void,
) -> *mut c_void {
    envoy(|| Box::into_raw(Box::new(0u64)) as *mut c_void)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
    _scheduler: *mut c_void,
    _event_id: u64,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
    scheduler: *mut c_void,
) {
    // SAFETY: created by `scheduler_new` above.
    envoy(|| drop(unsafe { Box::from_raw(scheduler as *mut u64) }))
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_header(
    filter_envoy: *mut c_void,
    header_type: u32,
    key: ModuleBuffer,
    result: *mut EnvoyBuffer,
    index: usize,
    count_out: *mut usize,
) -> bool {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module lends the key and out-pointers.
        unsafe {
            let f = filter(filter_envoy);
            let map = if header_type == HEADER_TYPE_REQUEST {
                f.request.borrow()
            } else {
                f.response.borrow()
            };
            let key = module_bytes(key).unwrap_or_default();
            let values: Vec<&(Vec<u8>, Vec<u8>)> = map.iter().filter(|(k, _)| k == key).collect();
            *count_out = values.len();
            *result = match values.get(index) {
                Some((_, v)) => EnvoyBuffer {
                    ptr: v.as_ptr(),
                    len: v.len(),
                },
                None => EnvoyBuffer {
                    ptr: ptr::null(),
                    len: 0,
                },
            };
        }
        true
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers_size(
    filter_envoy: *mut c_void,
    header_type: u32,
) -> usize {
    // SAFETY: the tests pass their FakeFilter.
    let f = unsafe { filter(filter_envoy) };
    if header_type == HEADER_TYPE_REQUEST {
        f.request.borrow().len()
    } else {
        f.response.borrow().len()
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_get_headers(
    filter_envoy: *mut c_void,
    header_type: u32,
    result: *mut EnvoyHeader,
) -> bool {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module sized `result` for every header.
        unsafe {
            let f = filter(filter_envoy);
            let map = if header_type == HEADER_TYPE_REQUEST {
                f.request.borrow()
            } else {
                f.response.borrow()
            };
            for (i, (k, v)) in map.iter().enumerate() {
                *result.add(i) = EnvoyHeader {
                    key_ptr: k.as_ptr(),
                    key_len: k.len(),
                    value_ptr: v.as_ptr(),
                    value_len: v.len(),
                };
            }
        }
        true
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_set_header(
    filter_envoy: *mut c_void,
    header_type: u32,
    key: ModuleBuffer,
    value: ModuleBuffer,
) -> bool {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module lends the buffers.
        unsafe {
            let f = filter(filter_envoy);
            let mut map = if header_type == HEADER_TYPE_REQUEST {
                f.request.borrow_mut()
            } else {
                f.response.borrow_mut()
            };
            let key = module_bytes(key).unwrap_or_default().to_vec();
            map.retain(|(k, _)| *k != key);
            if let Some(v) = module_bytes(value) {
                map.push((key, v.to_vec()));
            }
        }
        true
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_add_header(
    filter_envoy: *mut c_void,
    header_type: u32,
    key: ModuleBuffer,
    value: ModuleBuffer,
) -> bool {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module lends the buffers.
        unsafe {
            let f = filter(filter_envoy);
            let mut map = if header_type == HEADER_TYPE_RESPONSE {
                f.response.borrow_mut()
            } else {
                f.request.borrow_mut()
            };
            map.push((
                module_bytes(key).unwrap_or_default().to_vec(),
                module_bytes(value).unwrap_or_default().to_vec(),
            ));
        }
        true
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response(
    filter_envoy: *mut c_void,
    status: u32,
    headers: *const ModuleHeader,
    headers_len: usize,
    body: ModuleBuffer,
    details: ModuleBuffer,
) {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module lends the rest.
        unsafe {
            let f = filter(filter_envoy);
            let headers = std::slice::from_raw_parts(headers, headers_len)
                .iter()
                .map(|h| {
                    (
                        text(envoy_bytes(h.key_ptr, h.key_len)),
                        text(envoy_bytes(h.value_ptr, h.value_len)),
                    )
                })
                .collect();
            *f.sent.borrow_mut() = Some(Sent {
                local_reply: true,
                status,
                headers,
                body: text(module_bytes(body).unwrap_or_default()),
                details: text(module_bytes(details).unwrap_or_default()),
            });
        }
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_send_response_headers(
    filter_envoy: *mut c_void,
    headers: *const ModuleHeader,
    headers_len: usize,
    end_stream: bool,
) {
    envoy(|| {
        // SAFETY: the tests pass their FakeFilter; the module lends the rest.
        unsafe {
            let f = filter(filter_envoy);
            let mut headers: Vec<(String, String)> =
                std::slice::from_raw_parts(headers, headers_len)
                    .iter()
                    .map(|h| {
                        (
                            text(envoy_bytes(h.key_ptr, h.key_len)),
                            text(envoy_bytes(h.value_ptr, h.value_len)),
                        )
                    })
                    .collect();
            let status = headers
                .iter()
                .position(|(n, _)| n == ":status")
                .map(|i| headers.remove(i).1);
            *f.sent.borrow_mut() = Some(Sent {
                local_reply: false,
                status: status.and_then(|s| s.parse().ok()).unwrap_or(0),
                headers,
                body: String::new(),
                details: format!("end_stream={end_stream}"),
            });
        }
    })
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_callback_http_filter_get_worker_index(
    filter_envoy: *mut c_void,
) -> u32 {
    // SAFETY: the tests pass their FakeFilter.
    unsafe { filter(filter_envoy) }.worker
}

// ---- driving the hooks -----------------------------------------------------------------

/// A filter configuration created through the hooks, destroyed with it.
pub struct Loaded {
    pub envoy: Box<FakeConfig>,
    pub module: *const c_void,
}

impl Loaded {
    pub fn new(json: &str) -> Option<Loaded> {
        let envoy = Box::<FakeConfig>::default();
        let name = b"tokengate";
        // SAFETY: a live FakeConfig and buffers valid for the call.
        let module = unsafe {
            envoy_dynamic_module_on_http_filter_config_new(
                envoy.ptr(),
                EnvoyBuffer {
                    ptr: name.as_ptr(),
                    len: name.len(),
                },
                EnvoyBuffer {
                    ptr: json.as_ptr(),
                    len: json.len(),
                },
            )
        };
        (!module.is_null()).then_some(Loaded { envoy, module })
    }

    pub fn tick(&self) {
        // SAFETY: the configuration this test created.
        unsafe {
            envoy_dynamic_module_on_http_filter_config_scheduled(self.envoy.ptr(), self.module, 1)
        }
    }

    pub fn last_callout(&self) -> Option<Callout> {
        self.envoy.callouts.borrow().last().cloned()
    }

    /// Answers callout `id` with `status` and `body`.
    pub fn answer(&self, id: u64, status: Option<&str>, body: &[u8]) {
        let status_key = b":status";
        let headers: Vec<EnvoyHeader> = status
            .map(|s| EnvoyHeader {
                key_ptr: status_key.as_ptr(),
                key_len: status_key.len(),
                value_ptr: s.as_ptr(),
                value_len: s.len(),
            })
            .into_iter()
            .collect();
        // Two chunks, as Envoy's buffers come.
        let (a, b) = body.split_at(body.len() / 2);
        let chunks = [
            EnvoyBuffer {
                ptr: a.as_ptr(),
                len: a.len(),
            },
            EnvoyBuffer {
                ptr: b.as_ptr(),
                len: b.len(),
            },
        ];
        let result = if status.is_some() {
            CALLOUT_RESULT_SUCCESS
        } else {
            1
        };
        // SAFETY: the configuration this test created; arrays valid for the call.
        unsafe {
            envoy_dynamic_module_on_http_filter_config_http_callout_done(
                self.envoy.ptr(),
                self.module,
                id,
                result,
                headers.as_ptr(),
                headers.len(),
                chunks.as_ptr(),
                chunks.len(),
            )
        }
    }

    /// One stream through the hooks: new, request headers, response headers (when it went
    /// upstream), destroy. Returns what the request-headers hook answered.
    pub fn stream(&self, f: &FakeFilter) -> u32 {
        // SAFETY: the configuration this test created and a live FakeFilter.
        unsafe {
            let module = envoy_dynamic_module_on_http_filter_new(self.module, f.ptr());
            assert!(!module.is_null());
            let status = envoy_dynamic_module_on_http_filter_request_headers(f.ptr(), module, true);
            if status == HEADERS_CONTINUE {
                envoy_dynamic_module_on_http_filter_response_headers(f.ptr(), module, true);
            }
            envoy_dynamic_module_on_http_filter_destroy(module);
            status
        }
    }
}

impl Drop for Loaded {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        unsafe { envoy_dynamic_module_on_http_filter_config_destroy(self.module) }
    }
}
