//! Who is calling: HTTP Basic with a user's password, or a bearer JWT
//! signed by this site (HS256 with the node's token secret).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use ocmesh_node::{Node, Principal};

use crate::ApiState;
use crate::error::ApiError;

/// How long a sign-in token is good for.
pub const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub iss: String,
    pub iat: u64,
    pub exp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token for `who`, valid for `lifetime_secs`.
pub fn issue_token(node: &Node, who: &Principal, lifetime_secs: u64) -> Result<String, ApiError> {
    let iat = unix_now();
    let claims = Claims {
        sub: who.id.clone(),
        name: who.name.clone(),
        iss: node.site().to_owned(),
        iat,
        exp: iat + lifetime_secs,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(node.token_secret()),
    )
    .map_err(|e| ApiError::internal(format!("cannot sign a token: {e}")))
}

/// Checks a token's signature, issuer and expiry.
pub fn verify_token(node: &Node, token: &str) -> Result<Principal, ApiError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_issuer(&[node.site()]);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(node.token_secret()), &validation)
        .map_err(|e| ApiError::unauthorized(format!("bearer token refused: {e}")))?;
    // A token does not outlive its user: deleting the user's document ends it.
    if !node
        .user_exists(&data.claims.sub)
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        return Err(ApiError::unauthorized(format!(
            "bearer token refused: user {} no longer exists",
            data.claims.sub
        )));
    }
    Ok(Principal {
        id: data.claims.sub,
        name: data.claims.name,
        roles: Vec::new(),
    })
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("no Authorization header: use Basic or Bearer"))?
            .to_str()
            .map_err(|_| ApiError::unauthorized("Authorization header is not ASCII"))?;
        let (scheme, value) = header.split_once(' ').unwrap_or((header, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            let who = verify_token(&state.node, value)?;
            // Roles are looked up per request, so a revoked membership takes effect at once.
            let node = state.node.clone();
            let who = tokio::task::spawn_blocking(move || node.with_roles(who))
                .await
                .map_err(|e| ApiError::internal(format!("role lookup failed: {e}")))??;
            return Ok(Caller(who));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| ApiError::unauthorized("Basic credentials are not base64"))?;
            let text =
                String::from_utf8(decoded).map_err(|_| ApiError::unauthorized("Basic credentials are not UTF-8"))?;
            let (user, password) = text
                .split_once(':')
                .ok_or_else(|| ApiError::unauthorized("Basic credentials lack a ':'"))?;
            return Ok(Caller(state.node.authenticate(user, password).await?));
        }
        Err(ApiError::unauthorized(format!(
            "unsupported authorization scheme {scheme:?}: use Basic or Bearer"
        )))
    }
}
