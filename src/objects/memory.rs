//! An in-memory [`ObjectStore`] for tests: same ordering and missing-key rules as S3.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{ObjectError, ObjectStore};

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryStore {
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().expect("not poisoned").keys().cloned().collect()
    }
}

impl ObjectStore for MemoryStore {
    fn bucket(&self) -> &str {
        "memory"
    }

    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<(), ObjectError>> {
        self.objects.lock().expect("not poisoned").insert(key.to_string(), body);
        futures::future::ready(Ok(())).boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, ObjectError>> {
        let got = self.objects.lock().expect("not poisoned").get(key).cloned();
        futures::future::ready(Ok(got)).boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str, start_after: Option<&'a str>) -> BoxFuture<'a, Result<Vec<String>, ObjectError>> {
        let keys = self
            .objects
            .lock()
            .expect("not poisoned")
            .keys()
            .filter(|k| k.starts_with(prefix) && start_after.is_none_or(|s| k.as_str() > s))
            .cloned()
            .collect();
        futures::future::ready(Ok(keys)).boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ObjectError>> {
        self.objects.lock().expect("not poisoned").remove(key);
        futures::future::ready(Ok(())).boxed()
    }

    fn presign_get<'a>(&'a self, key: &'a str, _expires_in: Duration) -> BoxFuture<'a, Result<String, ObjectError>> {
        futures::future::ready(Ok(format!("memory:///{key}"))).boxed()
    }
}
