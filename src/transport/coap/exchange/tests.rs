use std::cell::Cell;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

use super::*;

const CFG: ExchangeConfig = ExchangeConfig {
    max_block: 1024,
    max_request: 256,
    dedup_per_peer: 2,
    dedup_lifetime_ms: 1000,
    max_peers: 4,
    amplification_limit: false,
    echo_lifetime_ms: 1000,
};

/// A fixed image and an echoing DFU answer, counting calls.
struct Fixed {
    image: Bytes,
    dfu_calls: Cell<usize>,
    /// (offset, len) of every block the exchange said it served.
    served: std::cell::RefCell<Vec<(u64, u64)>>,
}

impl Fixed {
    fn new(len: usize) -> Fixed {
        Fixed {
            image: Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>()),
            dfu_calls: Cell::new(0),
            served: Default::default(),
        }
    }
}

impl Resources for Fixed {
    fn dfu(&self, device: &str, status: &[u8], _now: u64) -> DfuAnswer {
        self.dfu_calls.set(self.dfu_calls.get() + 1);
        match status {
            b"bad" => DfuAnswer::BadInput,
            _ => DfuAnswer::Command(format!("cmd for {device}").into_bytes()),
        }
    }

    fn firmware(&self, device: &str) -> FirmwareAnswer {
        match device {
            "dev-1" => FirmwareAnswer::Image(Image { bytes: self.image.clone(), digest: [9; 32] }),
            "busy" => FirmwareAnswer::Unavailable,
            _ => FirmwareAnswer::NotAssigned,
        }
    }

    fn block_served(&self, _device: &str, offset: u64, len: u64, _now: u64) -> bool {
        self.served.borrow_mut().push((offset, len));
        true
    }
}

fn peer(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 40000))
}

fn request(kind: MessageType, method: RequestType, path: &str, mid: u16) -> Packet {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = mid;
    p.set_token(vec![0xde, 0xad]);
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    p
}

fn run(x: &mut Exchange, res: &Fixed, from: SocketAddr, p: &Packet) -> (Outcome, Option<Packet>) {
    let mut out = Vec::new();
    let o = x.handle(from, &p.to_bytes().unwrap(), 0, 0, Access::Open, res, &mut out);
    (o, (!out.is_empty()).then(|| Packet::from_bytes(&out).unwrap()))
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn opt_uint(p: &Packet, o: CoapOption) -> Option<u32> {
    p.get_first_option(o).map(|v| read_uint(v).unwrap())
}

#[test]
fn block2_serves_slices_with_etag_size2_and_more_flag() {
    let res = Fixed::new(2500);
    let mut x = Exchange::new(CFG);
    let mut req = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 7);
    req.add_option(CoapOption::Block2, uint(6)); // num 0, szx 6 (1024)
    let (o, r) = run(&mut x, &res, peer(1), &req);
    let r = r.unwrap();
    assert_eq!(o, Outcome::Answered("block"));
    assert_eq!(r.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(r.header.message_id, 7);
    assert_eq!(r.get_token(), &[0xde, 0xad]);
    assert_eq!(code(&r), ResponseType::Content);
    assert_eq!(r.payload, &res.image[..1024]);
    assert_eq!(opt_uint(&r, CoapOption::Block2), Some(8 | 6), "num 0, more, szx 6");
    assert_eq!(opt_uint(&r, CoapOption::Size2), Some(2500));
    assert_eq!(r.get_first_option(CoapOption::ETag).unwrap(), &[9u8; 8]);

    // The last block, asked for directly (random access), 64 bytes at a time.
    let mut req = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 8);
    req.add_option(CoapOption::Block2, uint((39 << 4) | 2)); // 39 * 64 = 2496
    let r = run(&mut x, &res, peer(1), &req).1.unwrap();
    assert_eq!(r.payload, &res.image[2496..]);
    assert_eq!(opt_uint(&r, CoapOption::Block2), Some((39 << 4) | 2), "no more flag on the last block");
    assert_eq!(opt_uint(&r, CoapOption::Size2), None);
    assert_eq!(*res.served.borrow(), [(0, 1024), (2496, 4)]);
}

#[test]
fn block_sizes_above_the_cap_are_scaled_and_past_the_end_is_4_02() {
    let res = Fixed::new(5000);
    let cfg = ExchangeConfig { max_block: 256, ..CFG };
    let mut x = Exchange::new(cfg);
    let mut req = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 1);
    req.add_option(CoapOption::Block2, uint((1 << 4) | 6)); // block 1 of 1024 = block 4 of 256
    let r = run(&mut x, &res, peer(1), &req).1.unwrap();
    assert_eq!(opt_uint(&r, CoapOption::Block2), Some((4 << 4) | 8 | 4));
    assert_eq!(r.payload, &res.image[1024..1280]);
    let mut req = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 2);
    req.add_option(CoapOption::Block2, uint((20 << 4) | 4));
    assert_eq!(code(&run(&mut x, &res, peer(1), &req).1.unwrap()), ResponseType::BadOption);
    let mut req = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 3);
    req.add_option(CoapOption::Block2, uint(7)); // szx 7 is reserved
    assert_eq!(code(&run(&mut x, &res, peer(1), &req).1.unwrap()), ResponseType::BadRequest);
    assert_eq!(*res.served.borrow(), [(1024, 256)], "refused blocks are not counted as served");
    let req = request(MessageType::Confirmable, RequestType::Get, "/fw/busy", 4);
    assert_eq!(code(&run(&mut x, &res, peer(1), &req).1.unwrap()), ResponseType::ServiceUnavailable);
}

#[test]
fn errors_are_typed_responses() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let cases: Vec<(Packet, ResponseType)> = vec![
        (request(MessageType::Confirmable, RequestType::Get, "/fw/nobody", 1), ResponseType::NotFound),
        (request(MessageType::Confirmable, RequestType::Get, "/nothing/here", 2), ResponseType::NotFound),
        (request(MessageType::Confirmable, RequestType::Put, "/fw/dev-1", 3), ResponseType::MethodNotAllowed),
        (request(MessageType::Confirmable, RequestType::Get, "/dfu/dev-1", 4), ResponseType::MethodNotAllowed),
        {
            let mut p = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 5);
            p.add_option(CoapOption::ContentFormat, uint(50)); // JSON
            (p, ResponseType::UnsupportedContentFormat)
        },
        {
            let mut p = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 6);
            p.payload = vec![0; 257];
            (p, ResponseType::RequestEntityTooLarge)
        },
        {
            let mut p = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 7);
            p.add_option(CoapOption::Unknown(2049), vec![1]); // unknown critical
            (p, ResponseType::BadOption)
        },
        {
            let mut p = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 8);
            p.payload = b"bad".to_vec();
            (p, ResponseType::BadRequest)
        },
    ];
    for (req, want) in cases {
        let r = run(&mut x, &res, peer(1), &req).1.expect("a reply");
        assert_eq!(code(&r), want, "mid {}", req.header.message_id);
    }
    // Unknown elective options and Uri-Port are tolerated.
    let mut p = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 9);
    p.add_option(CoapOption::Unknown(2048), vec![1]);
    p.add_option(CoapOption::UriPort, uint(5683));
    p.add_option(CoapOption::ContentFormat, uint(60));
    let r = run(&mut x, &res, peer(1), &p).1.unwrap();
    assert_eq!(code(&r), ResponseType::Changed);
    assert_eq!(opt_uint(&r, CoapOption::ContentFormat), Some(60));
    assert_eq!(r.payload, b"cmd for dev-1");
}

#[test]
fn an_accept_other_than_the_resources_format_is_4_06_and_serves_nothing() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let with_accept = |method, path, mid, accept: u32| {
        let mut p = request(MessageType::Confirmable, method, path, mid);
        p.add_option(CoapOption::Accept, uint(accept));
        p
    };
    // /dfu answers CBOR only; /fw answers octet-stream only.
    for (i, (method, path, accept)) in [
        (RequestType::Post, "/dfu/dev-1", 50u32), // JSON
        (RequestType::Post, "/dfu/dev-1", 42),    // octet-stream
        (RequestType::Get, "/fw/dev-1", 60),      // CBOR
        (RequestType::Get, "/fw/dev-1", 0),       // text/plain
    ]
    .into_iter()
    .enumerate()
    {
        let (o, r) = run(&mut x, &res, peer(1), &with_accept(method, path, i as u16, accept));
        assert_eq!(code(&r.expect("a reply")), ResponseType::NotAcceptable, "{path} Accept {accept}");
        assert_eq!(o.label(), "not_acceptable");
    }
    assert_eq!(res.dfu_calls.get(), 0, "no Status was executed");
    assert!(res.served.borrow().is_empty(), "no block was served");
    // The formats each resource does serve are accepted.
    let (_, r) = run(&mut x, &res, peer(1), &with_accept(RequestType::Post, "/dfu/dev-1", 10, 60));
    assert_eq!(code(&r.unwrap()), ResponseType::Changed);
    let (_, r) = run(&mut x, &res, peer(1), &with_accept(RequestType::Get, "/fw/dev-1", 11, 42));
    assert_eq!(code(&r.unwrap()), ResponseType::Content);
}

#[test]
fn retransmitted_requests_are_answered_from_the_cache_not_re_executed() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let req = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 42).to_bytes().unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    assert_eq!(x.handle(peer(1), &req, 0, 0, Access::Open, &res, &mut a), Outcome::Answered("dfu"));
    assert_eq!(x.handle(peer(1), &req, 500, 0, Access::Open, &res, &mut b), Outcome::Duplicate);
    assert_eq!(a, b);
    assert_eq!(res.dfu_calls.get(), 1);
    // Another peer with the same message id is a different exchange.
    assert_eq!(x.handle(peer(2), &req, 500, 0, Access::Open, &res, &mut b), Outcome::Answered("dfu"));
    // After the lifetime, the same id is new again.
    assert_eq!(x.handle(peer(1), &req, 1500, 0, Access::Open, &res, &mut b), Outcome::Answered("dfu"));
    assert_eq!(res.dfu_calls.get(), 3);
}

#[test]
fn non_requests_get_non_responses_and_pings_get_resets() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let r = run(&mut x, &res, peer(1), &request(MessageType::NonConfirmable, RequestType::Post, "/dfu/dev-1", 5))
        .1
        .unwrap();
    assert_eq!(r.header.get_type(), MessageType::NonConfirmable);
    assert_eq!(r.get_token(), &[0xde, 0xad]);
    let mut out = Vec::new();
    assert_eq!(
        x.handle(peer(1), &[0x40, 0x00, 0x12, 0x34], 0, 0, Access::Open, &res, &mut out),
        Outcome::Answered("ping")
    );
    assert_eq!(out, [0x70, 0x00, 0x12, 0x34]);
}

#[test]
fn malformed_datagrams_get_4_00_when_a_reply_is_possible() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let mut out = Vec::new();
    // CON, token 1 byte, then an option with the reserved delta 15.
    assert_eq!(
        x.handle(peer(1), &[0x41, 0x01, 0x00, 0x01, 0xaa, 0xf0], 0, 0, Access::Open, &res, &mut out),
        Outcome::Answered("malformed")
    );
    let r = Packet::from_bytes(&out).unwrap();
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert_eq!(r.get_token(), &[0xaa]);
    for junk in [&[][..], &[0x40][..], &[0x80, 1, 2, 3][..], &[0x59, 1, 2, 3][..]] {
        assert_eq!(
            x.handle(peer(1), junk, 0, 0, Access::Open, &res, &mut out),
            Outcome::Dropped("malformed"),
            "{junk:?}"
        );
        assert!(out.is_empty());
    }
}

#[test]
fn datagrams_longer_than_the_receive_buffer_get_4_13_when_confirmable() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    let mut out = Vec::new();
    let head = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 9).to_bytes().unwrap();
    assert_eq!(x.refuse_oversized(peer(1), &head, 0, &mut out), Outcome::Answered("too_large"));
    let r = Packet::from_bytes(&out).unwrap();
    assert_eq!(
        (code(&r), r.header.message_id, r.get_token()),
        (ResponseType::RequestEntityTooLarge, 9, &[0xde, 0xad][..])
    );
    assert_eq!(opt_uint(&r, CoapOption::Size1), Some(CFG.max_request as u32));
    assert_eq!(res.dfu_calls.get(), 0, "nothing was executed");
    assert_eq!(x.refuse_oversized(peer(1), &head, 1, &mut out), Outcome::Duplicate, "a retransmission hits the cache");
    let non = request(MessageType::NonConfirmable, RequestType::Post, "/dfu/dev-1", 10).to_bytes().unwrap();
    assert_eq!(x.refuse_oversized(peer(1), &non, 0, &mut out), Outcome::Dropped("too_large"));
    assert_eq!(x.refuse_oversized(peer(1), &[0x40], 0, &mut out), Outcome::Dropped("malformed"));
}

#[test]
fn remembered_peers_are_bounded() {
    let res = Fixed::new(100);
    let mut x = Exchange::new(CFG);
    for n in 1..=50u8 {
        for mid in 0..5 {
            run(&mut x, &res, peer(n), &request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", mid));
        }
        assert!(x.peers() <= CFG.max_peers);
        assert!(x.order.len() <= CFG.max_peers * 2 + 1);
        assert!(x.peers.values().all(|p| p.answers.len() <= CFG.dedup_per_peer));
    }
}

#[test]
fn twenty_thousand_random_and_mutated_datagrams_never_panic() {
    let res = Fixed::new(3000);
    let mut x = Exchange::new(CFG);
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut valid = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 1);
    valid.add_option(CoapOption::Block2, uint(0x16));
    let seeds = [
        valid.to_bytes().unwrap(),
        request(MessageType::NonConfirmable, RequestType::Post, "/dfu/dev-1", 2).to_bytes().unwrap(),
    ];
    let mut out = Vec::new();
    let mut answered = 0;
    for i in 0..20_000u32 {
        let d: Vec<u8> = if i % 2 == 0 {
            (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
        } else {
            let mut d = seeds[(i / 2 % 2) as usize].clone();
            for _ in 0..rng.usize(1..5) {
                let at = rng.usize(..d.len());
                d[at] = rng.u8(..);
            }
            d.truncate(rng.usize(1..d.len() + 5));
            d
        };
        let from = peer(rng.u8(1..9));
        if let Outcome::Answered(_) | Outcome::Duplicate = x.handle(from, &d, i as u64, 0, Access::Open, &res, &mut out)
        {
            answered += 1;
            assert!(Packet::from_bytes(&out).is_ok() || out.len() == 4, "every reply is a valid CoAP message");
        }
    }
    assert!(answered > 1000, "mutations of valid requests are mostly still answered ({answered})");
}

fn handle_as(x: &mut Exchange, res: &Fixed, p: &Packet, now_ms: u64, access: Access<'_>) -> (Outcome, Packet, usize) {
    let mut out = Vec::new();
    let o = x.handle(peer(1), &p.to_bytes().unwrap(), now_ms, 0, access, res, &mut out);
    let len = out.len();
    (o, Packet::from_bytes(&out).unwrap(), len)
}

#[test]
fn device_resources_follow_access() {
    let res = Fixed::new(4096);
    let mut x = Exchange::new(CFG);
    let get = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 1);
    let mut post = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 2);
    post.payload = b"status".to_vec();

    // Plain while devices must authenticate: 4.01, and neither resource is touched.
    let (o, a, _) = handle_as(&mut x, &res, &get, 0, Access::Refused);
    assert_eq!(
        (o, a.header.code),
        (Outcome::Answered("unauthorized"), MessageClass::Response(ResponseType::Unauthorized))
    );
    let (o, _, _) = handle_as(&mut x, &res, &post, 0, Access::Refused);
    assert_eq!(o, Outcome::Answered("unauthorized"));
    // Another device's session: 4.03.
    let mut get3 = get.clone();
    get3.header.message_id = 3;
    let (o, a, _) = handle_as(&mut x, &res, &get3, 0, Access::Device("dev-2"));
    assert_eq!((o, a.header.code), (Outcome::Answered("forbidden"), MessageClass::Response(ResponseType::Forbidden)));
    let mut post4 = post.clone();
    post4.header.message_id = 4;
    assert_eq!(handle_as(&mut x, &res, &post4, 0, Access::Device("dev-2")).0, Outcome::Answered("forbidden"));
    assert_eq!(res.dfu_calls.get(), 0, "no Status reached the session");
    assert!(res.served.borrow().is_empty(), "no block counted as served");
    // Its own device: served.
    let mut get5 = get.clone();
    get5.header.message_id = 5;
    assert_eq!(handle_as(&mut x, &res, &get5, 0, Access::Device("dev-1")).0, Outcome::Answered("block"));
    // Other resources are not the device's: a wrong path is still 4.04, not 4.01.
    let other = request(MessageType::Confirmable, RequestType::Get, "/elsewhere", 6);
    assert_eq!(handle_as(&mut x, &res, &other, 0, Access::Refused).0, Outcome::Answered("not_found"));
}

fn limited() -> ExchangeConfig {
    ExchangeConfig { amplification_limit: true, echo_lifetime_ms: 10_000, ..CFG }
}

#[test]
fn large_answers_to_unverified_addresses_are_an_echo_challenge_until_it_comes_back() {
    let res = Fixed::new(4096);
    let mut x = Exchange::new(limited());
    let mut get = request(MessageType::Confirmable, RequestType::Get, "/fw/dev-1", 1);
    get.add_option(CoapOption::Block2, uint(6)); // block 0 of 1024
    let sent = get.to_bytes().unwrap().len();
    let (o, a, len) = handle_as(&mut x, &res, &get, 0, Access::Open);
    assert_eq!(o, Outcome::Answered("echo"));
    assert_eq!(a.header.code, MessageClass::Response(ResponseType::Unauthorized));
    assert!(len <= 3 * sent, "{len} bytes answered to {sent}");
    assert!(res.served.borrow().is_empty(), "a block not sent is not progress");
    let echo = a.get_first_option(CoapOption::from(ECHO)).expect("an Echo option").clone();

    // A retransmission gets the same challenge, from the cache.
    let (o, again, _) = handle_as(&mut x, &res, &get, 10, Access::Open);
    assert_eq!((o, again.get_first_option(CoapOption::from(ECHO))), (Outcome::Duplicate, Some(&echo)));

    // A forged or stale Echo is no proof.
    for (bad, at) in [(vec![0u8; 12], 20), (echo.clone(), ECHO_FRESH_MS + 2000)] {
        let mut g = get.clone();
        g.header.message_id = 2;
        g.set_token(vec![at as u8]);
        g.add_option(CoapOption::from(ECHO), bad);
        assert_eq!(handle_as(&mut x, &res, &g, at, Access::Open).0, Outcome::Answered("echo"));
    }

    // The request repeated with the Echo is answered in full, and so are the next ones for
    // the lifetime.
    let mut with_echo = get.clone();
    with_echo.header.message_id = 3;
    with_echo.add_option(CoapOption::from(ECHO), echo.clone());
    let (o, full, _) = handle_as(&mut x, &res, &with_echo, 30, Access::Open);
    assert_eq!((o, full.payload.len()), (Outcome::Answered("block"), 1024));
    let mut next = get.clone();
    next.header.message_id = 4;
    next.set_token(vec![4]);
    assert_eq!(handle_as(&mut x, &res, &next, 5_000, Access::Open).0, Outcome::Answered("block"));

    // Once the lifetime is over, a retransmission of that request may not replay the block.
    let (o, replay, len) = handle_as(&mut x, &res, &next, 10_100, Access::Open);
    assert_eq!(
        (o, replay.header.code),
        (Outcome::Answered("echo"), MessageClass::Response(ResponseType::Unauthorized))
    );
    assert!(len <= 3 * next.to_bytes().unwrap().len());
}

#[test]
fn small_answers_need_no_echo_and_the_limit_covers_dfu_answers() {
    let res = Fixed::new(4096);
    let mut x = Exchange::new(limited());
    // A 4.04 is smaller than its request: sent as it is.
    let missing = request(MessageType::Confirmable, RequestType::Get, "/fw/nobody", 1);
    assert_eq!(handle_as(&mut x, &res, &missing, 0, Access::Open).0, Outcome::Answered("not_found"));
    // A short Status whose Command would be much larger: challenged.
    struct Big;
    impl Resources for Big {
        fn dfu(&self, _: &str, _: &[u8], _: u64) -> DfuAnswer {
            DfuAnswer::Command(vec![7; 900])
        }
        fn firmware(&self, _: &str) -> FirmwareAnswer {
            FirmwareAnswer::NotAssigned
        }
        fn block_served(&self, _: &str, _: u64, _: u64, _: u64) -> bool {
            true
        }
    }
    let mut post = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 2);
    post.payload = vec![0xa0];
    let mut out = Vec::new();
    let o = x.handle(peer(1), &post.to_bytes().unwrap(), 0, 0, Access::Open, &Big, &mut out);
    assert_eq!(o, Outcome::Answered("echo"));
    assert!(out.len() <= 3 * post.to_bytes().unwrap().len());
}

#[test]
fn duplicates_are_keyed_by_token_too() {
    let res = Fixed::new(64);
    let mut x = Exchange::new(CFG);
    let mut a = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 9);
    a.payload = b"s".to_vec();
    assert_eq!(run(&mut x, &res, peer(1), &a).0, Outcome::Answered("dfu"));
    assert_eq!(run(&mut x, &res, peer(1), &a).0, Outcome::Duplicate);
    // Same message id, another token: another request (a client that reused the id).
    let mut b = a.clone();
    b.set_token(vec![1, 2, 3]);
    assert_eq!(run(&mut x, &res, peer(1), &b).0, Outcome::Answered("dfu"));
    assert_eq!(res.dfu_calls.get(), 2);
}

#[test]
fn a_status_from_an_unverified_address_is_not_acted_on_before_it_returns_the_echo() {
    let res = Fixed::new(64);
    let mut x = Exchange::new(limited());
    let mut post = request(MessageType::Confirmable, RequestType::Post, "/dfu/dev-1", 1);
    post.payload = b"s".to_vec();
    let (o, a, _) = handle_as(&mut x, &res, &post, 0, Access::Open);
    assert_eq!(o, Outcome::Answered("echo"));
    assert_eq!(res.dfu_calls.get(), 0, "a spoofed source cannot post a Status");
    let mut again = post.clone();
    again.header.message_id = 2;
    again.add_option(CoapOption::from(ECHO), a.get_first_option(CoapOption::from(ECHO)).unwrap().clone());
    assert_eq!(handle_as(&mut x, &res, &again, 100, Access::Open).0, Outcome::Answered("dfu"));
    assert_eq!(res.dfu_calls.get(), 1);
}
