//! nftables from the agent itself: libnftables (the library the `nft` command is a thin
//! shell around, shipped with it as `libnftables.so.1`) loaded once at run time, each batch
//! of commands run in the network namespace of the calling thread. The same parser, the same
//! transaction and the same listing as `nft -f -` and `nft list`, byte for byte, without a
//! process per pod (a fork and exec of `nsenter` and `nft` cost 5-15 ms on a busy node; the
//! library call 0.3-0.5 ms).
//!
//! Loaded with dlopen rather than linked, so building needs no nftables headers, and a node
//! without the library gets one clear error at start-up (the agent's first batch is the host
//! table, [`super::host::install`]).

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

/// The shared object, as the nftables package installs it.
pub const LIBRARY: &str = "libnftables.so.1";

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("loading {LIBRARY} (install the nftables package): {0}")]
    Load(String),
    #[error("{0}")]
    Failed(String),
    #[error("nft_ctx_new failed")]
    Context,
    #[error("commands contain a NUL byte")]
    Nul,
}

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The functions of libnftables the agent calls (its stable public API, `nftables/libnftables.h`).
struct Api {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxBuffer,
    buffer_error: CtxBuffer,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
    run: RunCmd,
    // Keeps the functions above mapped.
    _lib: libloading::Library,
}

fn load() -> Result<Api, String> {
    // SAFETY: loading libnftables runs its initialisers, which only set up the library's own
    // state; the symbols are looked up with the signatures its header declares.
    unsafe {
        let lib = libloading::Library::new(LIBRARY).map_err(|e| e.to_string())?;
        let ctx_new = *lib.get::<CtxNew>(b"nft_ctx_new\0").map_err(|e| e.to_string())?;
        let ctx_free = *lib.get::<CtxFree>(b"nft_ctx_free\0").map_err(|e| e.to_string())?;
        let buffer_output = *lib
            .get::<CtxBuffer>(b"nft_ctx_buffer_output\0")
            .map_err(|e| e.to_string())?;
        let buffer_error = *lib
            .get::<CtxBuffer>(b"nft_ctx_buffer_error\0")
            .map_err(|e| e.to_string())?;
        let get_output = *lib
            .get::<CtxGetBuffer>(b"nft_ctx_get_output_buffer\0")
            .map_err(|e| e.to_string())?;
        let get_error = *lib
            .get::<CtxGetBuffer>(b"nft_ctx_get_error_buffer\0")
            .map_err(|e| e.to_string())?;
        let run = *lib
            .get::<RunCmd>(b"nft_run_cmd_from_buffer\0")
            .map_err(|e| e.to_string())?;
        Ok(Api {
            ctx_new,
            ctx_free,
            buffer_output,
            buffer_error,
            get_output,
            get_error,
            run,
            _lib: lib,
        })
    }
}

fn api() -> Result<&'static Api, NftError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(|e| NftError::Load(e.clone()))
}

/// One libnftables context, freed on drop.
struct Ctx<'a> {
    api: &'a Api,
    ptr: *mut c_void,
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from nft_ctx_new and is freed once, here.
        unsafe { (self.api.ctx_free)(self.ptr) }
    }
}

/// libnftables keeps process-wide state (its parser's symbol tables, the GMP allocator it
/// sets); calls are serialised. Each takes well under a millisecond.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `commands` (what `nft -f -` would read) in the calling thread's network namespace,
/// as one transaction; returns what `nft` would print. The error carries nft's message.
pub fn run(commands: &str) -> Result<String, NftError> {
    let api = api()?;
    let input = CString::new(commands).map_err(|_| NftError::Nul)?;
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // SAFETY: the context is created here (its netlink socket in this thread's namespace),
    // used by this thread only, and freed by `Ctx`'s drop; the buffers it returns are
    // NUL-terminated strings owned by the context, copied before it is freed.
    unsafe {
        let ptr = (api.ctx_new)(0);
        if ptr.is_null() {
            return Err(NftError::Context);
        }
        let ctx = Ctx { api, ptr };
        (api.buffer_output)(ctx.ptr);
        (api.buffer_error)(ctx.ptr);
        let rc = (api.run)(ctx.ptr, input.as_ptr());
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        if rc != 0 {
            return Err(NftError::Failed(text((api.get_error)(ctx.ptr)).trim().to_owned()));
        }
        Ok(text((api.get_output)(ctx.ptr)))
    }
}
