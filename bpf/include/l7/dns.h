/* DNS on a socket connected to port 53: a 12-byte header whose QR bit says query (0) or
 * answer (1); the message id pairs them (it is the pending request's stream). */
#ifndef COROOT_AGENT_L7_DNS_H
#define COROOT_AGENT_L7_DNS_H

#define CA_DNS_PORT 53

static __always_inline int l7_dns_query(u8 *b, u32 n) { return n >= 12 && !(b[2] & 0x80); }

static __always_inline int l7_dns_answer(u8 *b, u32 n) { return n >= 12 && (b[2] & 0x80); }

static __always_inline u32 l7_dns_id(u8 *b) { return ((u32)b[0] << 8) | b[1]; }

#endif
