//! Test guest: exports a filter from a future major version of the ABI, which
//! this host must refuse by name.

wit_bindgen::generate!({ path: "wit", world: "next-major" });

struct Future;

impl exports::imhost::plugin::filter::Guest for Future {
    fn check(_content: String) -> bool {
        true
    }
}

export!(Future);
