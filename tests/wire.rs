//! DESIGN section 4, row by row, against real redis-servers.

mod common;

use common::*;

#[tokio::test]
async fn client_sees_the_profile_user_without_credentials() {
    let server = RedisServer::start(ServerAuth::app());
    let amb = Ambassador::start(&server, "").await;
    let mut c = amb.connect().await;
    assert_eq!(c.cmd(&["ACL", "WHOAMI"]).await, bulk(USER.as_bytes()));
    assert_eq!(c.cmd(&["SET", "k", "v"]).await, simple("OK"));
    assert_eq!(c.cmd(&["GET", "k"]).await, bulk(b"v"));
}
