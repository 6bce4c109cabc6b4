// Types of imhost.js (kept by hand beside it: there is no build step).

/** Close codes a terminal may see. */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  PROTOCOL_ERROR: 1002;
  ABNORMAL: 1006;
  INVALID_DATA: 1007;
  POLICY: 1008;
  TOO_BIG: 1009;
  TRY_AGAIN_LATER: 1013;
  /** Raised by the client: no frame arrived in answer to a keep-alive probe. */
  NO_ANSWER: 4000;
}>;

/** imhost's receipt texts and what they mean. */
export declare const ReceiptStatus: Readonly<Record<string, "delivered" | "offline" | "filtered">>;

/** What the application's backend hands back: the URL, or `{ url }` as imhost's API answers; `null` means "do not connect". */
export type ConnectAnswer = string | { url: string } | null | undefined;

/** The parts of the WHATWG WebSocket the client uses. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export interface ImhostClientOptions {
  /** Asks the application's backend for a fresh connect URL (tokens are single use). */
  connectUrl: () => Promise<ConnectAnswer> | ConnectAnswer;
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** First reconnect delay before jitter, ms. Default 500. */
  initialDelayMs?: number;
  /** Largest reconnect delay before jitter, ms. Default 30 000. */
  maxDelayMs?: number;
  /** Least delay after a 1013 close, ms. Default 5 000. */
  overloadDelayMs?: number;
  /** Quiet time before a keep-alive probe, ms; 0 sends none. Default 25 000. */
  probeIntervalMs?: number;
  /** Time a probe gets an answer in before the link counts as dead, ms. Default 10 000. */
  probeTimeoutMs?: number;
  /** Time an opening handshake gets, ms. Default 15 000. */
  connectTimeoutMs?: number;
  /** Source of randomness for the jitter, in [0, 1). Default `Math.random`. */
  random?: () => number;
}

export interface OpenEvent {
  url: string;
}

export interface MessageEvent {
  /** The frame's text, exactly as the backend's message was serialised. */
  text: string;
  /** The text parsed as JSON, or undefined when it is not JSON. */
  json: unknown;
}

export interface ReceiptEvent {
  /** What the receipt says; "other" for a text this client does not know. */
  status: "delivered" | "offline" | "filtered" | "other";
  /** The receipt text as sent (FreeIM's Chinese texts). */
  text: string;
  /** The message the receipt is about, parsed from JSON when it is JSON. */
  content: unknown;
  /** Why a filter plugin dropped it (status "filtered"). */
  reason?: string;
  /** The frame's text. */
  raw: string;
}

export interface CloseEvent {
  code: number;
  reason: string;
  wasClean: boolean;
  /** False after 1008 (policy) and after stop(). */
  willReconnect: boolean;
}

export interface ReconnectingEvent {
  /** 1 for the first retry after a success. */
  attempt: number;
  /** How long the client waits before fetching a URL again. */
  delayMs: number;
  reason: "closed" | "overloaded" | "dead" | "url-failed";
  /** The close code, when a socket closed. */
  code?: number;
  /** What `connectUrl` or the WebSocket constructor threw. */
  error?: unknown;
}

export interface ImhostClientEvents {
  open: OpenEvent;
  message: MessageEvent;
  receipt: ReceiptEvent;
  close: CloseEvent;
  reconnecting: ReconnectingEvent;
}

export type ClientState = "idle" | "connecting" | "open" | "waiting" | "stopped";

export declare class ImhostClient {
  constructor(options: ImhostClientOptions);
  readonly state: ClientState;
  /** Listens for an event; returns a function that stops listening. */
  on<K extends keyof ImhostClientEvents>(type: K, listener: (event: ImhostClientEvents[K]) => void): () => void;
  off<K extends keyof ImhostClientEvents>(type: K, listener: (event: ImhostClientEvents[K]) => void): void;
  /** Starts connecting and reconnecting. */
  start(): this;
  /** Closes the socket and stops reconnecting. */
  stop(code?: number, reason?: string): void;
  /** Sends a text frame to the node's inbound plugins; false when not open. */
  send(text: string): boolean;
  /** The wait before reconnect attempt `attempt` (1, 2, …), with jitter. */
  backoff(attempt: number): number;
}
