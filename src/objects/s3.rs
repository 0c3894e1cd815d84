//! The S3 adapter for [`ObjectStore`], on `aws-sdk-s3`.

use std::time::Duration;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::presigning::PresigningConfig;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{ObjectError, ObjectStore};

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Store {
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> S3Store {
        S3Store { client, bucket: bucket.into() }
    }

    /// From the environment's credentials. With an `endpoint` (an emulator), addressing is
    /// path-style: a bucket name is not a resolvable host there.
    pub async fn from_env(bucket: impl Into<String>, region: Option<String>, endpoint: Option<String>) -> S3Store {
        let config = crate::cloud::aws::sdk_config(region, None).await;
        let mut builder = aws_sdk_s3::config::Builder::from(&config);
        if let Some(e) = endpoint {
            builder = builder.endpoint_url(e).force_path_style(true);
        }
        S3Store::new(aws_sdk_s3::Client::from_conf(builder.build()), bucket)
    }

    fn error<E>(&self, op: &'static str, key: &str, e: E) -> ObjectError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        ObjectError {
            op,
            bucket: self.bucket.clone(),
            key: key.to_string(),
            message: DisplayErrorContext(&e).to_string(),
            source: Some(Box::new(e)),
        }
    }
}

impl ObjectStore for S3Store {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    fn put<'a>(&'a self, key: &'a str, body: Vec<u8>) -> BoxFuture<'a, Result<(), ObjectError>> {
        async move {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .body(body.into())
                .send()
                .await
                .map_err(|e| self.error("put", key, e))?;
            Ok(())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, ObjectError>> {
        async move {
            let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
                Ok(out) => out,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
                Err(e) if e.code() == Some("NoSuchKey") => return Ok(None),
                Err(e) => return Err(self.error("get", key, e)),
            };
            let body = out.body.collect().await.map_err(|e| self.error("read", key, e))?;
            Ok(Some(body.into_bytes().to_vec()))
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str, start_after: Option<&'a str>) -> BoxFuture<'a, Result<Vec<String>, ObjectError>> {
        async move {
            let mut keys = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_start_after(start_after.map(String::from))
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.error("list", prefix, e))?;
                keys.extend(out.contents().iter().filter_map(|o| o.key().map(String::from)));
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            Ok(keys)
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ObjectError>> {
        async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| self.error("delete", key, e))?;
            Ok(())
        }
        .boxed()
    }

    fn presign_get<'a>(&'a self, key: &'a str, expires_in: Duration) -> BoxFuture<'a, Result<String, ObjectError>> {
        async move {
            let config = PresigningConfig::expires_in(expires_in).map_err(|e| self.error("presign", key, e))?;
            let req = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .presigned(config)
                .await
                .map_err(|e| self.error("presign", key, e))?;
            Ok(req.uri().to_string())
        }
        .boxed()
    }
}
