use super::*;

fn workload() -> Workload {
    Workload {
        uid: "0d9c-uid".into(),
        namespace: "team-a".into(),
        name: "web-1".into(),
        service_account: "web".into(),
        pod_role: None,
        service_account_role: None,
        service_account_unreadable: false,
        ips: vec![],
        running: true,
        running_since: None,
        terminating: false,
        host_network: false,
    }
}

#[test]
fn selectors_name_the_pods_namespace_service_account_and_uid() {
    let got: Vec<(String, String)> = selectors(&workload()).into_iter().map(|s| (s.kind, s.value)).collect();
    let want = [("k8s", "ns:team-a"), ("k8s", "sa:web"), ("k8s", "pod-uid:0d9c-uid")];
    let want: Vec<(String, String)> = want.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    assert_eq!(got, want);
}

/// Derived by hand from the proto: FetchJWTSVIDsRequest.audience = 1 (string, tag 0x0a),
/// selectors = 2 (message, tag 0x12); Selector.type = 1 (0x0a), value = 2 (0x12).
#[test]
fn request_encoding_matches_the_published_field_numbers() {
    let selector = Selector {
        kind: "k8s".into(),
        value: "ns:a".into(),
    };
    let got = wire::fetch_request(&["sts"], &[selector]);
    let want: &[u8] = &[
        0x0a, 0x03, b's', b't', b's', // audience
        0x12, 0x0b, // selectors, 11 bytes
        0x0a, 0x03, b'k', b'8', b's', // type
        0x12, 0x04, b'n', b's', b':', b'a', // value
    ];
    assert_eq!(&got[..], want);
}

#[test]
fn frames_are_flag_then_big_endian_length() {
    let framed = wire::frame(b"abc").unwrap();
    assert_eq!(&framed[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    assert_eq!(wire::unframe(&framed).unwrap(), b"abc");
    assert!(wire::unframe(&[0, 0, 0, 0, 4, b'a']).is_err(), "short frame accepted");
    assert!(
        wire::unframe(&[1, 0, 0, 0, 1, b'a']).is_err(),
        "compressed frame accepted"
    );
    assert!(wire::unframe(&[0, 0]).is_err(), "truncated prefix accepted");
}

fn len_field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, u8::try_from(bytes.len()).unwrap()];
    out.extend_from_slice(bytes);
    out
}

/// JWTSVID: token = 1, id = 2 (SPIFFEID: trust_domain = 1, path = 2), expires_at = 3 and
/// issued_at = 4 (varints, skipped), hint = 5 (tag 0x2a); an unknown field 9 is skipped.
#[test]
fn response_decoding_reads_token_id_and_hint_and_skips_the_rest() {
    let id = [len_field(0x0a, b"example.org"), len_field(0x12, b"/ns/team-a/sa/web")].concat();
    let svid = [
        len_field(0x0a, b"h.p.s"),
        len_field(0x12, &id),
        vec![0x18, 0x96, 0x01], // expires_at = 150
        vec![0x20, 0x01],       // issued_at = 1
        len_field(0x2a, b"external"),
        vec![0x48, 0x07], // field 9, varint
    ]
    .concat();
    let response = [len_field(0x0a, &svid), len_field(0x0a, &svid)].concat();
    let svids = wire::fetch_response(&response).unwrap();
    assert_eq!(svids.len(), 2);
    assert_eq!(svids[0].token.expose(), "h.p.s");
    assert_eq!(svids[0].spiffe_id, "spiffe://example.org/ns/team-a/sa/web");
    assert_eq!(svids[0].hint, "external");
    assert!(
        wire::fetch_response(&[0x0a, 0x05, 0x0a]).is_err(),
        "truncated message accepted"
    );
    assert!(
        wire::fetch_response(&[0x08, 0x01]).is_err(),
        "svids as a varint accepted"
    );
}

fn svid(token: &str, id: &str) -> JwtSvid {
    JwtSvid {
        token: Secret::new(token),
        spiffe_id: id.into(),
        hint: String::new(),
    }
}

#[test]
fn exactly_one_svid_is_used_none_or_several_are_refused() {
    let sel = selectors(&workload());
    let one = pick("team-a/web-1".into(), &sel, vec![svid("t1", "spiffe://x/a")]).unwrap();
    assert_eq!(one.expose(), "t1");

    let none = pick("team-a/web-1".into(), &sel, vec![]).unwrap_err();
    assert_eq!(none.kind(), "svid_none");
    assert!(none.is_transient(), "a registration may appear soon: 503");
    assert!(none.to_string().contains("k8s:pod-uid:0d9c-uid"), "{none}");

    let two = vec![svid("t1", "spiffe://x/a"), svid("t2", "spiffe://x/b")];
    let several = pick("team-a/web-1".into(), &sel, two).unwrap_err();
    assert_eq!(several.kind(), "svid_ambiguous");
    assert!(!several.is_transient());
    assert!(!several.to_string().contains("t1"), "a token leaked into {several}");

    let empty = pick("p".into(), &sel, vec![svid("", "spiffe://x/a")]).unwrap_err();
    assert_eq!(empty.kind(), "svid_unavailable");
}

#[test]
fn grpc_statuses_are_classified() {
    let denied = classify("p", (7, "not authorized".into()));
    assert_eq!((denied.kind(), denied.is_transient()), ("svid_denied", false));
    let unauth = classify("p", (16, String::new()));
    assert_eq!(unauth.kind(), "svid_denied");
    for code in [4, 8, 14] {
        let e = classify("p", (code, String::new()));
        assert_eq!((e.kind(), e.is_transient()), ("svid_unavailable", true), "code {code}");
    }
    let invalid = classify("p", (3, String::new()));
    assert_eq!((invalid.kind(), invalid.is_transient()), ("svid_refused", false));
}

#[test]
fn grpc_message_is_percent_decoded() {
    assert_eq!(percent_decode("no%20entry%3A x"), "no entry: x");
    assert_eq!(percent_decode("50%"), "50%");
    assert_eq!(percent_decode("%zz"), "%zz");
}

#[tokio::test]
async fn an_absent_socket_is_unavailable() {
    let client = Client::new(Config {
        socket: "/nonexistent/imds-broker-test/admin.sock".into(),
        audience: "sts.amazonaws.com".into(),
    });
    let error = client.mint(&workload()).await.unwrap_err();
    assert_eq!((error.kind(), error.is_transient()), ("svid_unavailable", true));
    assert!(error.to_string().contains("team-a/web-1"), "{error}");
}
