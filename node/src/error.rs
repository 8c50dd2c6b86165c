//! Typed errors, one enum per kind of operation.

use crate::ids::NameError;
pub use crate::store::StorageError;

/// Why a write was refused. Everything but `Storage` and `Closed` is the
/// caller's input; nothing was written in any case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("`_id` must be a string, not {0}")]
    IdNotString(String),
    #[error("`_id` in the body ({body}) differs from the id in the path ({path})")]
    IdMismatch { path: String, body: String },
    #[error("document {collection}/{id} already exists")]
    AlreadyExists { collection: String, id: String },
    #[error("document {collection}/{id} not found")]
    NotFound { collection: String, id: String },
    /// A peer stamped the document's newest version further ahead than
    /// this site's clock may follow (the drift bound); a local write would
    /// be ordered below it and never become current.
    #[error(
        "document {collection}/{id} has a version stamped {stamped} by site {origin}, ahead of this site's clock by more than the allowed drift; writes to it are refused until this site's clock passes that time"
    )]
    ClockBehind {
        collection: String,
        id: String,
        origin: String,
        stamped: String,
    },
    #[error("refused a peer's changes: {0}")]
    Apply(#[from] ApplyError),
    #[error("index: {0}")]
    BadIndex(String),
    #[error(transparent)]
    WorkItem(#[from] crate::workitems::WorkItemError),
    #[error("invalid filter: {0}")]
    Filter(#[from] crate::query::FilterError),
    #[error("invalid update: {0}")]
    Update(#[from] crate::query::update::UpdateError),
    #[error("the document lacks uniqueness field {0:?}")]
    MissingUniqueField(String),
    #[error("{count} documents match the uniqueness fields {fields}; expected at most one")]
    NotUnique { fields: String, count: usize },
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("user: {0}")]
    BadUser(String),
    #[error("invalid _acl: {0}")]
    Acl(#[from] crate::acl::AclError),
    #[error("no {right} right on {collection}/{id}")]
    Forbidden {
        right: &'static str,
        collection: String,
        id: String,
    },
    #[error("document {collection}/{id} is not deleted; nothing to recover")]
    NotDeleted { collection: String, id: String },
    /// A body nobody could read back (see `ocmesh_replication::change::MAX_BODY_DEPTH`).
    #[error("document {collection}/{id} nests arrays and objects {depth} levels deep; at most {max} are allowed")]
    TooDeep {
        collection: String,
        id: String,
        depth: usize,
        max: usize,
    },
    /// A body peers would refuse (see `ocmesh_replication::change::MAX_BODY_BYTES`).
    #[error("document {collection}/{id} would be {bytes} bytes of JSON; at most {max} are allowed")]
    TooLarge {
        collection: String,
        id: String,
        bytes: usize,
        max: usize,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the node is shutting down")]
    Closed,
}

/// Why a peer's batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ocmesh_replication::change::ChangeError),
    #[error("change {origin}:{seq} would leave a gap: the next change from {origin} must be {expected}")]
    Gap { origin: String, seq: u64, expected: u64 },
    #[error("a peer sent change {seq} under this site's own name, which has made only {held}")]
    OwnOrigin { seq: u64, held: u64 },
    #[error("change names an invalid document: {0}")]
    Name(NameError),
    #[error("change {origin}:{seq} has a body that is not a JSON object")]
    BodyNotObject { origin: String, seq: u64 },
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("document {collection}/{id} not found")]
    NotFound { collection: String, id: String },
    #[error("document {collection}/{id} has no version {version}")]
    NoSuchVersion {
        collection: String,
        id: String,
        version: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

macro_rules! read_storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ReadError {
            fn from(e: $t) -> Self {
                ReadError::Storage(StorageError::from(e))
            }
        }
    )*};
}
read_storage_from!(redb::StorageError, redb::TableError, redb::TransactionError);

/// Why a node could not open its data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot open database {path}: {source}")]
    Database { path: String, source: redb::DatabaseError },
    #[error("data directory belongs to site {stored:?}, not {configured:?}; use another --data directory")]
    SiteMismatch { stored: String, configured: String },
    #[error("invalid site name {0:?}: use lowercase letters, digits and '-'")]
    BadSiteName(String),
    #[error("stored credentials are damaged: {0}")]
    Credentials(String),
    #[error("cannot hash the admin password: {0}")]
    Hash(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a sign-in failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unknown user or wrong password")]
    BadCredentials,
    #[error("too many failed sign-ins for this user name; try again in {retry_after_secs} s")]
    TooManyAttempts { retry_after_secs: u64 },
    #[error(transparent)]
    Storage(#[from] StorageError),
}
