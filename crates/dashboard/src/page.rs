//! What every page shares: the guard in front of every route (sign-in,
//! the CSRF nonce cookie, security headers, error pages), the page chrome,
//! sign-in and sign-out, and the embedded assets.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use crate::Shared;
use crate::auth::{self, CSRF_COOKIE, CSRF_FIELD, SESSION_COOKIE, SESSION_SECONDS};
use crate::error::PageError;
use crate::params::Params;

/// The embedded script.
const SCRIPT: &str = include_str!("../assets/app.js");
/// The embedded style sheet.
const STYLE: &str = include_str!("../assets/app.css");

/// Who is asking, as the guard found out: given to every handler.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The mount path (`""` or `/a/b`).
    pub(crate) base: String,
    /// The CSRF token every form of this response carries.
    pub(crate) csrf: String,
    /// The cookie nonce the token belongs to.
    nonce: String,
    /// Whether actions are served.
    pub(crate) actions: bool,
    /// Signed in with the session cookie (a sign-out button is shown).
    pub(crate) session: bool,
}

impl Ctx {
    /// A link to `path` (which starts with `/`) under the mount path.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The hidden CSRF field of a form.
    pub(crate) fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name=(CSRF_FIELD) value=(self.csrf); }
    }

    /// Parses a POSTed form whose fields are `allowed` (the CSRF field is
    /// always allowed), refusing it (403) unless it carries this client's
    /// CSRF token.
    pub(crate) fn form(
        &self,
        shared: &Shared,
        body: Result<Bytes, axum::extract::rejection::BytesRejection>,
        allowed: &[&str],
    ) -> Result<Params, PageError> {
        let body = body.map_err(|e| PageError::bad(format!("the form cannot be read: {e}")))?;
        let mut names: Vec<&str> = allowed.to_vec();
        names.push(CSRF_FIELD);
        let mut params = Params::parse(&body, &names);
        let token = params.raw(CSRF_FIELD).unwrap_or_default();
        if token.is_empty() || !shared.keys.csrf_valid(&self.nonce, &token) {
            return Err(PageError::Forbidden(
                "this form has no valid CSRF token (it must be sent from a page of this dashboard, with its cookies): reload the page and submit it again".to_owned(),
            ));
        }
        Ok(params)
    }
}

/// The guard in front of every route.
pub(crate) async fn guard(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers().clone();
    let cookies = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join("; ");
    let now = chrono::Utc::now().timestamp();
    let (nonce, new_nonce) = match auth::cookie(&cookies, CSRF_COOKIE) {
        Some(n) if n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (n.to_owned(), false)
        }
        _ => (auth::nonce(), true),
    };
    let session =
        auth::cookie(&cookies, SESSION_COOKIE).is_some_and(|c| shared.keys.session_valid(c, now));
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ctx = Ctx {
        base: shared.base.clone(),
        csrf: shared.keys.csrf(&nonce),
        nonce: nonce.clone(),
        actions: !shared.read_only,
        session,
    };
    let path = request.uri().path().to_owned();
    let public = path == "/login" || path.starts_with("/assets/");
    let mut response = if shared.keys.has_token() && !public && !session {
        match bearer {
            Some(given) if shared.keys.token_matches(given) => {
                request.extensions_mut().insert(ctx.clone());
                next.run(request).await
            }
            Some(_) => unauthorized(&ctx, "the bearer token is wrong", &request),
            None => unauthorized(&ctx, "this dashboard needs its token: sign in", &request),
        }
    } else {
        request.extensions_mut().insert(ctx.clone());
        next.run(request).await
    };
    if let Some(error) = response.extensions_mut().remove::<PageError>() {
        let status = error.status();
        response = (status, error_page(&ctx, &error)).into_response();
    }
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if new_nonce
        && let Ok(cookie) = HeaderValue::from_str(&format!(
            "{CSRF_COOKIE}={nonce}; Path={}; HttpOnly; SameSite=Strict",
            cookie_path(&shared.base)
        ))
    {
        h.append(header::SET_COOKIE, cookie);
    }
    response
}

fn cookie_path(base: &str) -> &str {
    if base.is_empty() { "/" } else { base }
}

fn unauthorized(ctx: &Ctx, why: &str, request: &Request) -> Response {
    let next = request
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| request.uri().to_string(), |u| u.0.to_string());
    let next = if request.method() == Method::GET {
        Some(next)
    } else {
        None
    };
    let mut response = (
        StatusCode::UNAUTHORIZED,
        layout(ctx, "Sign in", "", login_form(ctx, why, next.as_deref())),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"hephaestus\""),
    );
    response
}

impl IntoResponse for PageError {
    /// The guard renders the page (it knows the mount path and the CSRF
    /// token); this carries the error to it.
    fn into_response(self) -> Response {
        let mut response = self.status().into_response();
        response.extensions_mut().insert(self);
        response
    }
}

impl Clone for PageError {
    fn clone(&self) -> Self {
        match self {
            Self::BadRequest(l) => Self::BadRequest(l.clone()),
            Self::Unauthorized(l) => Self::Unauthorized(l.clone()),
            Self::Forbidden(l) => Self::Forbidden(l.clone()),
            Self::NotFound(l) => Self::NotFound(l.clone()),
            Self::MethodNotAllowed(l) => Self::MethodNotAllowed(l.clone()),
            Self::Conflict(l) => Self::Conflict(l.clone()),
            Self::Unavailable(l) => Self::Unavailable(l.clone()),
            Self::Internal(l) => Self::Internal(l.clone()),
        }
    }
}

/// The page of an error.
fn error_page(ctx: &Ctx, error: &PageError) -> maud::Markup {
    layout(
        ctx,
        error.title(),
        "",
        html! {
            section.error data-status=(error.status().as_u16()) {
                h1 { (error.title()) " (" (error.status().as_u16()) ")" }
                ul.problems { @for line in error.lines() { li { (line) } } }
                p { a href=(ctx.url("/")) { "Back to the overview" } }
            }
        },
    )
}

/// The page chrome: head, navigation, main.
pub(crate) fn layout(ctx: &Ctx, title: &str, active: &str, main: Markup) -> Markup {
    layout_with(ctx, title, active, None, main)
}

/// [`layout`] whose main refreshes itself every `refresh_ms` (an active
/// instance).
pub(crate) fn layout_with(
    ctx: &Ctx,
    title: &str,
    active: &str,
    refresh_ms: Option<u128>,
    main: Markup,
) -> Markup {
    let main = maud::PreEscaped(main.into_string());
    let nav = [
        ("overview", "/", "Overview"),
        ("instances", "/instances", "Instances"),
        ("workflows", "/workflows", "Workflows"),
        ("jobs", "/jobs", "Jobs"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Hephaestus" }
                link rel="stylesheet" href=(ctx.url(&format!("/assets/app.css?v={}", env!("CARGO_PKG_VERSION"))));
                script src=(ctx.url(&format!("/assets/app.js?v={}", env!("CARGO_PKG_VERSION")))) defer {}
            }
            body {
                header.top {
                    a.brand href=(ctx.url("/")) { "Hephaestus" }
                    nav {
                        @for (key, path, label) in nav {
                            a class=[(key == active).then_some("active")] href=(ctx.url(path)) { (label) }
                        }
                    }
                    @if !ctx.actions { span.badge { "read-only" } }
                    @if ctx.session {
                        form.logout method="post" action=(ctx.url("/logout")) {
                            (ctx.csrf_field())
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                @match refresh_ms {
                    Some(ms) => main id="main" data-refresh-ms=(ms) { (main) },
                    None => main id="main" { (main) },
                }
            }
        }
    }
}

fn login_form(ctx: &Ctx, why: &str, next: Option<&str>) -> Markup {
    html! {
        section.login {
            h1 { "Sign in" }
            p.problem { (why) }
            form method="post" action=(ctx.url("/login")) {
                (ctx.csrf_field())
                @if let Some(next) = next { input type="hidden" name="next" value=(next); }
                label { "Token " input type="password" name="token" autocomplete="current-password" required; }
                button type="submit" { "Sign in" }
            }
            p.hint { "The token is in the file given to " code { "hephaestus dashboard --token-file" } "." }
        }
    }
}

/// `GET /login`.
pub(crate) async fn login_page(
    State(shared): State<Arc<Shared>>,
    axum::Extension(ctx): axum::Extension<Ctx>,
) -> Result<Markup, PageError> {
    if !shared.keys.has_token() {
        return Err(PageError::NotFound(
            "this dashboard has no token to sign in with".to_owned(),
        ));
    }
    Ok(layout(
        &ctx,
        "Sign in",
        "",
        login_form(&ctx, "Give the dashboard's token.", None),
    ))
}

/// Where to go after signing in: a path of this dashboard, nothing else.
fn safe_next(base: &str, next: Option<&str>) -> String {
    let home = if base.is_empty() {
        "/".to_owned()
    } else {
        base.to_owned()
    };
    match next {
        Some(n)
            if n.starts_with(if base.is_empty() { "/" } else { base })
                && n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\') =>
        {
            n.to_owned()
        }
        _ => home,
    }
}

/// `POST /login`: the token, checked; a session cookie on success.
pub(crate) async fn login(
    State(shared): State<Arc<Shared>>,
    axum::Extension(ctx): axum::Extension<Ctx>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, PageError> {
    if !shared.keys.has_token() {
        return Err(PageError::NotFound(
            "this dashboard has no token to sign in with".to_owned(),
        ));
    }
    let mut form = ctx.form(&shared, body, &["token", "next"])?;
    let token = form.raw("token").unwrap_or_default();
    let next = form.one("next");
    form.finish()?;
    if !shared.keys.token_matches(&token) {
        return Ok((
            StatusCode::UNAUTHORIZED,
            layout(
                &ctx,
                "Sign in",
                "",
                login_form(&ctx, "That is not the token.", next.as_deref()),
            ),
        )
            .into_response());
    }
    let expiry = chrono::Utc::now().timestamp() + SESSION_SECONDS;
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path={}; Max-Age={SESSION_SECONDS}; HttpOnly; SameSite=Strict",
        shared.keys.session(expiry),
        cookie_path(&shared.base)
    );
    let mut headers = HeaderMap::new();
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    if let Ok(to) = HeaderValue::from_str(&safe_next(&shared.base, next.as_deref())) {
        headers.insert(header::LOCATION, to);
    }
    Ok((StatusCode::SEE_OTHER, headers).into_response())
}

/// `POST /logout`: the session cookie cleared.
pub(crate) async fn logout(
    State(shared): State<Arc<Shared>>,
    axum::Extension(ctx): axum::Extension<Ctx>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, PageError> {
    ctx.form(&shared, body, &[])?.finish()?;
    let mut headers = HeaderMap::new();
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}=; Path={}; Max-Age=0; HttpOnly; SameSite=Strict",
        cookie_path(&shared.base)
    )) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    if let Ok(to) = HeaderValue::from_str(&ctx.url("/login")) {
        headers.insert(header::LOCATION, to);
    }
    Ok((StatusCode::SEE_OTHER, headers).into_response())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// `GET /assets/app.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /assets/app.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// Any other path.
pub(crate) async fn not_found(request: Request) -> PageError {
    PageError::NotFound(format!(
        "no page {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// A known path with another method.
pub(crate) async fn method_not_allowed(request: Request) -> PageError {
    let path = request.uri().path();
    let hint = if request.method() == Method::GET {
        "it is an action: send it with its form (POST)"
    } else {
        "it is a page: open it (GET)"
    };
    PageError::MethodNotAllowed(format!("{} {path} is not served: {hint}", request.method()))
}

/// A 303 to `location`.
pub(crate) fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(to) => (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response(),
        Err(_) => PageError::Internal(format!("cannot redirect to {location:?}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_returns_only_to_pages_of_this_dashboard() {
        assert_eq!(safe_next("", Some("/instances?x=1")), "/instances?x=1");
        assert_eq!(safe_next("", Some("//evil.example/")), "/");
        assert_eq!(safe_next("", Some("https://evil.example/")), "/");
        assert_eq!(safe_next("/ops", Some("/ops/jobs")), "/ops/jobs");
        assert_eq!(safe_next("/ops", Some("/elsewhere")), "/ops");
        assert_eq!(safe_next("/ops", None), "/ops");
    }
}
