package dev.eventstage.kstreams;

import com.fasterxml.jackson.core.JsonFactory;
import com.fasterxml.jackson.core.JsonGenerator;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.math.BigInteger;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.ProcessorSupplier;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.RocksDBConfigSetter;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;
import org.rocksdb.BlockBasedTableConfig;
import org.rocksdb.LRUCache;
import org.rocksdb.Options;
import org.rocksdb.RocksDB;
import org.rocksdb.WriteBufferManager;

/**
 * The bank of eventstage's {@code src/stages/bank.rs} as a Kafka Streams application, with the wire
 * contract of {@code src/stages/bank_flow.rs}: commands in (key = account id, value = JSON {@code
 * {"id","op","amount"}}), one reply per command ({@code {"id","ok","balance","error"}}) and one event
 * per accepted command (the JSON serde gives eventstage's {@code BankEvent}: {@code "Opened"}, {@code
 * {"Deposited":{"amount":5}}}, ...).
 *
 * <p>Processor API, one persistent key-value store (RocksDB, the default; changelogged, not
 * cached, as {@code Stores.keyValueStoreBuilder} builds it): account id → balance, present while
 * the account is open (a closed account has balance 0 and no state, as eventstage drops it).
 * {@code processing.guarantee=exactly_once_v2}. A record that is not a command is counted and
 * skipped (eventstage sends it to a dead-letter topic).
 *
 * <p>Usage: {@code BankStreams --brokers H:P --application-id ID --input T --replies T --events T
 * --state-dir DIR [--commit-interval-ms 100] [--threads 1] [--rocksdb-memory-mib M]}. Runs until SIGTERM,
 * then closes and prints one line {@code bank-streams: N commands, R rejected, U not commands}.
 *
 * <p>{@code --rocksdb-memory-mib M} bounds RocksDB's memory to M MiB for all stores together, with
 * the {@link RocksDBConfigSetter} of Kafka Streams' documentation ("Bounded memory usage"): one
 * block cache shared by every store, holding the index and filter blocks too, with the memtables
 * charged to it by a shared write buffer manager. Without it, every setting is Kafka Streams'
 * default (a 50 MiB block cache and up to three 16 MiB memtables per store and partition, index
 * and filter blocks outside the cache).
 */
public final class BankStreams {
  static final String STORE = "accounts";
  static final AtomicLong COMMANDS = new AtomicLong();
  static final AtomicLong REJECTED = new AtomicLong();
  static final AtomicLong UNDECODABLE = new AtomicLong();

  private BankStreams() {}

  public static void main(String[] args) throws InterruptedException {
    Map<String, String> opts = new HashMap<>();
    for (int i = 0; i + 1 < args.length; i += 2) {
      if (!args[i].startsWith("--")) {
        usage("unexpected argument " + args[i]);
      }
      opts.put(args[i].substring(2), args[i + 1]);
    }
    if (args.length % 2 != 0) {
      usage("an option without a value: " + args[args.length - 1]);
    }
    for (String required : new String[] {"brokers", "application-id", "input", "replies", "events", "state-dir"}) {
      if (!opts.containsKey(required)) {
        usage("--" + required + " is required");
      }
    }
    Properties props = new Properties();
    props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, opts.get("brokers"));
    props.put(StreamsConfig.APPLICATION_ID_CONFIG, opts.get("application-id"));
    props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
    props.put(StreamsConfig.STATE_DIR_CONFIG, opts.get("state-dir"));
    props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, opts.getOrDefault("commit-interval-ms", "100"));
    props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, opts.getOrDefault("threads", "1"));
    if (opts.containsKey("rocksdb-memory-mib")) {
      BoundedMemory.init(Long.parseLong(opts.get("rocksdb-memory-mib")) << 20);
      props.put(StreamsConfig.ROCKSDB_CONFIG_SETTER_CLASS_CONFIG, BoundedMemory.class);
    }

    KafkaStreams streams = new KafkaStreams(topology(opts.get("input"), opts.get("replies"), opts.get("events")), props);
    CountDownLatch stopped = new CountDownLatch(1);
    streams.setUncaughtExceptionHandler(e -> {
      System.err.println("bank-streams: the stream thread failed: " + e);
      stopped.countDown();
      return org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse
          .SHUTDOWN_CLIENT;
    });
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      streams.close(Duration.ofSeconds(60));
      System.out.printf("bank-streams: %d commands, %d rejected, %d not commands%n",
          COMMANDS.get(), REJECTED.get(), UNDECODABLE.get());
      System.out.flush();
      stopped.countDown();
    }, "bank-streams-shutdown"));
    streams.start();
    stopped.await();
  }

  private static void usage(String why) {
    System.err.println("bank-streams: " + why);
    System.err.println("usage: BankStreams --brokers H:P --application-id ID --input T --replies T --events T "
        + "--state-dir DIR [--commit-interval-ms 100] [--threads 1] [--rocksdb-memory-mib M]");
    System.exit(2);
  }

  /**
   * RocksDB within one memory bound for every store of the process, as Kafka Streams' documentation
   * shows it ("Bounded memory usage"): a quarter of the bound for memtables, charged to the shared
   * block cache; a tenth of the cache kept for index and filter blocks (high priority).
   */
  public static final class BoundedMemory implements RocksDBConfigSetter {
    private static LRUCache cache;
    private static WriteBufferManager writeBufferManager;

    static synchronized void init(long bytes) {
      RocksDB.loadLibrary();
      cache = new LRUCache(bytes, -1, false, 0.1);
      writeBufferManager = new WriteBufferManager(bytes / 4, cache);
    }

    @Override
    public void setConfig(String storeName, Options options, Map<String, Object> configs) {
      BlockBasedTableConfig table = (BlockBasedTableConfig) options.tableFormatConfig();
      table.setBlockCache(cache);
      table.setCacheIndexAndFilterBlocks(true);
      table.setCacheIndexAndFilterBlocksWithHighPriority(true);
      table.setPinTopLevelIndexAndFilter(true);
      options.setWriteBufferManager(writeBufferManager);
      options.setTableFormatConfig(table);
    }

    @Override
    public void close(String storeName, Options options) {
      // The cache and the write buffer manager are shared by every store: never closed here.
    }
  }

  static Topology topology(String input, String replies, String events) {
    Topology t = new Topology();
    t.addSource("commands", Serdes.String().deserializer(), Serdes.ByteArray().deserializer(), input);
    t.addProcessor("bank", new BankSupplier(), "commands");
    t.addSink("replies", replies, Serdes.String().serializer(), Serdes.ByteArray().serializer(), "bank");
    t.addSink("events", events, Serdes.String().serializer(), Serdes.ByteArray().serializer(), "bank");
    return t;
  }

  static final class BankSupplier implements ProcessorSupplier<String, byte[], String, byte[]> {
    @Override
    public Processor<String, byte[], String, byte[]> get() {
      return new Bank();
    }

    @Override
    public Set<StoreBuilder<?>> stores() {
      return Set.of(Stores.keyValueStoreBuilder(Stores.persistentKeyValueStore(STORE), Serdes.String(), Serdes.Long()));
    }
  }

  /** A record that is not a command. */
  static final class NotACommand extends Exception {
    NotACommand(String why) {
      super(why, null, false, false);
    }
  }

  static final ObjectMapper MAPPER = new ObjectMapper();
  static final JsonFactory JSON = MAPPER.getFactory();
  static final BigInteger TWO_64 = BigInteger.ONE.shiftLeft(64);

  static final class Bank implements Processor<String, byte[], String, byte[]> {
    private ProcessorContext<String, byte[]> context;
    private KeyValueStore<String, Long> accounts;

    @Override
    public void init(ProcessorContext<String, byte[]> context) {
      this.context = context;
      this.accounts = context.getStateStore(STORE);
    }

    @Override
    public void process(Record<String, byte[]> record) {
      String key = record.key();
      String id;
      String op;
      JsonNode amountNode;
      try {
        if (key == null || record.value() == null) {
          throw new NotACommand("no key or no value");
        }
        JsonNode cmd = MAPPER.readTree(record.value());
        if (cmd == null || !cmd.path("id").isTextual() || !cmd.path("op").isTextual()) {
          throw new NotACommand("not a bank command");
        }
        id = cmd.get("id").textValue();
        op = cmd.get("op").textValue();
        amountNode = cmd.get("amount");
        if (!op.equals("open") && !op.equals("close") && !op.equals("deposit") && !op.equals("withdraw")) {
          throw new NotACommand("unknown op " + op);
        }
        // Validated up front, as eventstage's decoder does, so a bad amount is not a command.
        if ((op.equals("deposit") || op.equals("withdraw")) && amount(amountNode) == null) {
          throw new NotACommand(op + " needs an amount");
        }
      } catch (IOException | NotACommand e) {
        UNDECODABLE.incrementAndGet();
        return;
      }
      COMMANDS.incrementAndGet();
      Long state = accounts.get(key); // null: not open
      boolean open = state != null;
      long balance = open ? state : 0L;
      String error = null;
      byte[] event = null;
      long replyBalance = balance;
      try {
        switch (op) {
          case "open":
            if (open) {
              error = "account is already open";
            } else {
              accounts.put(key, 0L);
              event = "\"Opened\"".getBytes();
              replyBalance = balance;
            }
            break;
          case "deposit": {
            long amount = amount(amountNode);
            if (!open) {
              error = "account is not open";
            } else if (Long.compareUnsigned(balance + amount, balance) < 0) {
              error = "deposit would overflow the balance";
            } else {
              replyBalance = balance + amount;
              accounts.put(key, replyBalance);
              event = amountEvent("Deposited", amount);
            }
            break;
          }
          case "withdraw": {
            long amount = amount(amountNode);
            if (!open) {
              error = "account is not open";
            } else if (Long.compareUnsigned(amount, balance) > 0) {
              error = "insufficient funds: balance " + Long.toUnsignedString(balance) + ", requested "
                  + Long.toUnsignedString(amount);
            } else {
              replyBalance = balance - amount;
              accounts.put(key, replyBalance);
              event = amountEvent("Withdrawn", amount);
            }
            break;
          }
          default: // close
            if (!open) {
              error = "account is not open";
            } else if (balance != 0) {
              error = "balance is " + Long.toUnsignedString(balance) + ", not 0";
            } else {
              accounts.delete(key);
              event = "\"Closed\"".getBytes();
              replyBalance = 0;
            }
        }
      } catch (NotACommand e) {
        throw new IllegalStateException(e); // validated above
      }
      boolean ok = error == null;
      if (!ok) {
        REJECTED.incrementAndGet();
      }
      // On rejection: the current balance, null when the account is not open.
      Long shown = ok || open ? replyBalance : null;
      context.forward(record.withValue(reply(id, ok, shown, error)), "replies");
      if (event != null) {
        context.forward(record.withValue(event), "events");
      }
    }
  }

  /** An amount: a JSON integer in 0..2^64 (a u64, held in a long's bits), or null if absent or not one. */
  static Long amount(JsonNode n) throws NotACommand {
    if (n == null || n.isNull()) {
      return null;
    }
    if (!n.isIntegralNumber()) {
      throw new NotACommand("the amount is not an integer");
    }
    if (n.canConvertToLong() && n.longValue() >= 0) {
      return n.longValue();
    }
    BigInteger v = n.bigIntegerValue();
    if (v.signum() < 0 || v.compareTo(TWO_64) >= 0) {
      throw new NotACommand("the amount is not a u64");
    }
    return v.longValue();
  }

  static void writeUnsigned(JsonGenerator g, long v) throws IOException {
    if (v >= 0) {
      g.writeNumber(v);
    } else {
      g.writeNumber(new BigInteger(Long.toUnsignedString(v)));
    }
  }

  static byte[] amountEvent(String name, long amount) {
    ByteArrayOutputStream out = new ByteArrayOutputStream(32);
    try (JsonGenerator g = JSON.createGenerator(out)) {
      g.writeStartObject();
      g.writeFieldName(name);
      g.writeStartObject();
      g.writeFieldName("amount");
      writeUnsigned(g, amount);
      g.writeEndObject();
      g.writeEndObject();
    } catch (IOException e) {
      throw new IllegalStateException(e);
    }
    return out.toByteArray();
  }

  static byte[] reply(String id, boolean ok, Long balance, String error) {
    ByteArrayOutputStream out = new ByteArrayOutputStream(64);
    try (JsonGenerator g = JSON.createGenerator(out)) {
      g.writeStartObject();
      g.writeStringField("id", id);
      g.writeBooleanField("ok", ok);
      g.writeFieldName("balance");
      if (balance == null) {
        g.writeNull();
      } else {
        writeUnsigned(g, balance);
      }
      g.writeFieldName("error");
      if (error == null) {
        g.writeNull();
      } else {
        g.writeString(error);
      }
      g.writeEndObject();
    } catch (IOException e) {
      throw new IllegalStateException(e);
    }
    return out.toByteArray();
  }
}
