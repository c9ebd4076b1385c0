//! `credentials.source = "aws-iam"`: ElastiCache and MemoryDB IAM authentication. The
//! password is a SigV4-presigned `connect` request for the user
//! (`<cache>/?Action=connect&User=<user>`, `X-Amz-Expires=900`, `ResourceType=ServerlessCache`
//! for a serverless cache), signed by the AWS SDK's own signing crate with credentials from
//! its standard chain (environment, shared files and profiles, web identity, the container
//! and instance metadata endpoints). A token is valid for 15 minutes, and never past the AWS
//! credentials that signed it (temporary ones die with their session): the refresher signs
//! a new one before that ([`crate::refresh`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::ProvideCredentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use aws_smithy_http::query_writer::QueryWriter;
use secrecy::SecretString;
use thiserror::Error;

use super::Credentials;

/// How long a token is valid, as the services define it.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// `[credentials.aws_iam]`, validated.
#[derive(Debug, Clone)]
pub struct AwsIamSource {
    /// The replication group, cluster or serverless cache name: the host of the request.
    pub cache_name: String,
    /// The ElastiCache / MemoryDB user id: the `User` of the request and of `AUTH`.
    pub user: String,
    /// `None`: the SDK's region chain (`AWS_REGION`, the profile's `region`).
    pub region: Option<String>,
    /// `elasticache` or `memorydb`.
    pub service: String,
    pub serverless: bool,
    /// The AWS credentials and region of the last fetch, shared by every clone, so that a
    /// new connection gets a token signed for it ([`AwsIamSource::sign_now`]).
    pub last: Arc<Mutex<Option<(aws_credential_types::Credentials, String)>>>,
}

/// Why no token could be made. Never carries a key or a token.
#[derive(Debug, Error)]
pub enum AwsIamError {
    #[error("no AWS region: set credentials.aws_iam.region, AWS_REGION or the profile's region")]
    NoRegion,
    #[error("no AWS credentials provider")]
    NoProvider,
    #[error("AWS credentials: {0}")]
    Chain(String),
    #[error("signing the token: {0}")]
    Sign(String),
}

impl AwsIamSource {
    /// AWS credentials from the SDK's chain, and a token signed with them now.
    pub async fn fetch(&self) -> Result<Credentials, AwsIamError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let region = sdk.region().ok_or(AwsIamError::NoRegion)?.to_string();
        let provider = sdk.credentials_provider().ok_or(AwsIamError::NoProvider)?;
        let keys = provider
            .provide_credentials()
            .await
            .map_err(|e| AwsIamError::Chain(chain_reason(&e)))?;
        let credentials = self.signed(&keys, &region, SystemTime::now())?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((keys, region));
        Ok(credentials)
    }

    /// A token signed now with the AWS credentials of the last fetch, for one new
    /// connection; `None` before the first fetch or once those credentials expired (the
    /// caller uses the refreshed token in the store).
    pub fn sign_now(&self) -> Option<Credentials> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (keys, region) = last.as_ref()?;
        let now = SystemTime::now();
        if keys.expiry().is_some_and(|e| e <= now) {
            return None;
        }
        self.signed(keys, region, now).ok()
    }

    /// The token as credentials for `AUTH <user> <token>`, expiring with the token or the
    /// AWS credentials, whichever is first.
    fn signed(
        &self,
        keys: &aws_credential_types::Credentials,
        region: &str,
        now: SystemTime,
    ) -> Result<Credentials, AwsIamError> {
        let token = self.token(keys, region, now)?;
        let valid_until = now + TOKEN_LIFETIME;
        let expires_at = keys.expiry().map_or(valid_until, |e| e.min(valid_until));
        let mut credentials = Credentials::new(Some(self.user.clone()), SecretString::from(token));
        credentials.set_expires_at(Some(expires_at));
        Ok(credentials)
    }

    /// The token for `keys` in `region` at `time`: the presigned URL without its scheme, as
    /// the SDKs' presigners make it.
    pub fn token(
        &self,
        keys: &aws_credential_types::Credentials,
        region: &str,
        time: SystemTime,
    ) -> Result<String, AwsIamError> {
        // Both names are checked at start to need no percent-encoding.
        let mut url = format!(
            "https://{}/?Action=connect&User={}",
            self.cache_name, self.user
        );
        if self.serverless {
            url.push_str("&ResourceType=ServerlessCache");
        }
        let identity = keys.clone().into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(TOKEN_LIFETIME);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(&self.service)
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| AwsIamError::Sign(e.to_string()))?
            .into();
        let request =
            SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
                .map_err(|e| AwsIamError::Sign(e.to_string()))?;
        let (instructions, _signature) = sign(request, &params)
            .map_err(|e| AwsIamError::Sign(e.to_string()))?
            .into_parts();
        // The SDK's parameters, the signature last as every other SDK writes it (the Rust
        // SDK alone puts a session token after it; the services accept both orders).
        let (_, added) = instructions.into_parts();
        let (signature, rest): (Vec<_>, Vec<_>) = added
            .into_iter()
            .partition(|(k, _)| *k == "X-Amz-Signature");
        let mut query =
            QueryWriter::new_from_string(&url).map_err(|e| AwsIamError::Sign(e.to_string()))?;
        for (key, value) in rest.iter().chain(&signature) {
            query.insert(key, value);
        }
        let uri = query.build_uri().to_string();
        Ok(uri.strip_prefix("https://").unwrap_or(&uri).to_owned())
    }
}

/// The chain's error and its causes, which say which providers were tried and why they
/// failed (no secret: the providers never put one in an error).
fn chain_reason(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether `name` can go into the request unencoded: letters, digits, `-` and `_` (what the
/// services allow for user ids and cache names).
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/vectors/aws_iam.json, made with botocore (see the script beside it).
    #[test]
    fn tokens_match_the_official_sdk_byte_for_byte() {
        let text = include_str!("../../tests/vectors/aws_iam.json");
        let file: serde_json::Value = serde_json::from_str(text).unwrap();
        let vectors = file["vectors"].as_array().unwrap();
        assert_eq!(vectors.len(), 3);
        for v in vectors {
            let s = |k: &str| v[k].as_str().unwrap().to_owned();
            let source = AwsIamSource {
                cache_name: s("cache_name"),
                user: s("user"),
                region: None,
                service: s("service"),
                serverless: v["serverless"].as_bool().unwrap(),
                last: Default::default(),
            };
            let keys = aws_credential_types::Credentials::new(
                s("access_key_id"),
                s("secret_access_key"),
                v["session_token"].as_str().map(str::to_owned),
                None,
                "vector",
            );
            let time = crate::credentials::exec::parse_rfc3339(&s("time")).unwrap();
            let token = source.token(&keys, &s("region"), time).unwrap();
            assert_eq!(token, s("token"), "{}", s("name"));
        }
    }
}
