"""Offline reinforcement learning: a Decision Transformer with Aaren blocks on MuJoCo locomotion.

Title: Decision Transformer with AarenBlock on MuJoCo locomotion (offline RL)
Author: the keras_aaren authors
Description: collect D4RL-style datasets of HalfCheetah and Hopper from a seed (a linear policy
trained by Augmented Random Search, then "medium" and "medium-replay" rollouts), train a Decision
Transformer on them with `AarenBlock`s and with causal `keras.layers.MultiHeadAttention` blocks
of the same width and depth, and evaluate both in the simulator at two target returns. The
Aaren model is also served as a stream, one token at a time with its state carried over the
whole episode, and an Aaren model trained on whole episodes is streamed too.

Run:

    python examples/decision_transformer.py            # both environments and datasets, 3 seeds
    python examples/decision_transformer.py --quick    # a smoke run, for the test suite
    python examples/decision_transformer.py --envs halfcheetah --datasets medium --seeds 0

Requires `gymnasium[mujoco]` (the MuJoCo engine and the locomotion models ship in the wheels).
D4RL and Minari download their datasets at run time, so this example makes its own: nothing is
downloaded. The datasets are cached under `~/.keras/datasets/keras_aaren/` and reused.
Outputs: `outputs/decision_transformer.{json,md,png}` (the table and returns against targets)
and `outputs/decision_transformer_latency.png` (the latency of each decision over an episode).
"""

import argparse
import hashlib
import json
import os
import time

import keras
import numpy as np

from baselines import encoder, mean_std, write_outputs
from keras_aaren import streaming

"""
## The tasks

`gymnasium`'s MuJoCo locomotion tasks, version 5. D4RL reports a return `R` as the normalised
score `100 * (R - random) / (expert - random)`, with reference returns of a random and an expert
policy published per environment. Those references were measured on the v2 environments
(simulated through mujoco-py); this example applies them unchanged to v5, so its normalised
scores compare with published D4RL scores only approximately.

The target returns are those of the Decision Transformer paper (Chen et al., 2021).
"""

ENVS = {
    "halfcheetah": {
        "id": "HalfCheetah-v5",
        # D4RL's reference returns for halfcheetah (v2): random, expert.
        "reference": (-280.178953, 12135.0),
        "targets": (6000.0, 12000.0),
        # ARS V2-t hyperparameters of Mania et al. (2018) for HalfCheetah: step size, exploration
        # noise, directions, top directions; and the reward per step that ARS subtracts while
        # training (for the tasks that pay for staying alive).
        "ars": {"step_size": 0.02, "noise": 0.03, "directions": 32, "top": 4, "shift": 0.0},
        "ars_iterations": 100,
    },
    "hopper": {
        "id": "Hopper-v5",
        "reference": (-20.272305, 3234.3),
        "targets": (3600.0, 1800.0),
        "ars": {"step_size": 0.01, "noise": 0.025, "directions": 8, "top": 4, "shift": 1.0},
        "ars_iterations": 200,
    },
}
DATASETS = ("medium", "medium-replay")
# Action noise (standard deviation) of the medium policy, and the exploration noise of the
# medium-replay rollouts, from the first ARS iteration to the last.
MEDIUM_NOISE = 0.1
REPLAY_NOISE = (1.0, 0.05)
# Returns-to-go enter the model divided by this, as in the Decision Transformer for MuJoCo.
RETURN_SCALE = 1000.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run for the tests")
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0, help="seed of ARS and the datasets")
    parser.add_argument("--ars-iterations", type=int, default=None, help="default: per env")
    parser.add_argument("--dataset-steps", type=int, default=200_000, help="per dataset")
    parser.add_argument("--episode-steps", type=int, default=1000)
    parser.add_argument("--context", type=int, default=20, help="K, in timesteps")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64, help="windows of K timesteps")
    parser.add_argument("--episode-batch-size", type=int, default=4, help="whole episodes")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--query-initializer",
        default=None,
        choices=["zeros"],
        help="of Aaren's learned queries (default: the layer's, N(0, 1))",
    )
    parser.add_argument(
        "--episodes", type=int, default=10, help="evaluation episodes per target and seed"
    )
    parser.add_argument(
        "--cache-dir", default=os.path.join(os.path.expanduser("~"), ".keras", "datasets")
    )
    parser.add_argument("--output-dir", default="outputs")
    args = parser.parse_args(argv)
    if args.quick:
        args.envs, args.datasets, args.seeds = ["halfcheetah"], ["medium"], [0]
        args.ars_iterations, args.dataset_steps, args.episode_steps = 2, 96, 24
        args.width, args.depth = 32, 1
        args.epochs, args.steps_per_epoch, args.batch_size, args.episode_batch_size = 1, 1, 4, 2
        args.episodes = 2
    return args


def make_env(name, episode_steps):
    """The gymnasium environment, or a clear exit when MuJoCo cannot start."""
    try:
        import gymnasium

        return gymnasium.make(ENVS[name]["id"], max_episode_steps=episode_steps)
    except Exception as error:  # whatever stops MuJoCo from starting ends the example
        raise SystemExit(
            f"Could not start the MuJoCo environment {ENVS[name]['id']} "
            f"({type(error).__name__}: {error}). This example needs `pip install "
            '"gymnasium[mujoco]"` and a platform MuJoCo runs on.'
        ) from None


def normalized_score(name, value):
    random, expert = ENVS[name]["reference"]
    return 100.0 * (value - random) / (expert - random)


"""
## A behaviour policy from Augmented Random Search

D4RL's "medium" policy is an agent stopped at about a third of an expert's return; its
"medium-replay" dataset is that agent's replay buffer, from random behaviour up to "medium". The
behaviour policy here is a linear map from normalised observations to actions, trained by
Augmented Random Search (ARS V2-t, Mania et al., 2018): perturb the weights in random
directions, roll out each perturbation and its mirror image, and step along the directions whose
rollouts differ most. Observations are normalised by the running mean and standard deviation of
every state visited during training (the "V2" of ARS). It needs nothing but NumPy and the
simulator, and it is deterministic given a seed.
"""


class RunningStats:
    """Mean and variance of every observation seen, merged batch by batch (Chan et al.)."""

    def __init__(self, size):
        self.count = 0
        self.mean = np.zeros(size)
        self.squares = np.zeros(size)

    def update(self, batch):
        count = len(batch)
        if count == 0:
            return
        mean = batch.mean(axis=0)
        delta = mean - self.mean
        total = self.count + count
        self.squares += ((batch - mean) ** 2).sum(axis=0) + delta**2 * self.count * count / total
        self.mean = self.mean + delta * count / total
        self.count = total

    def mean_std(self):
        if self.count < 2:
            return self.mean.copy(), np.ones_like(self.mean)
        std = np.sqrt(self.squares / (self.count - 1))
        # Constant coordinates (ARS leaves them unscaled) would divide by zero.
        return self.mean.copy(), np.where(std < 1e-8, 1.0, std)


def linear_action(policy, observation):
    weights, mean, std = policy
    return np.clip(weights @ ((observation - mean) / std), -1.0, 1.0)


def rollout(env, policy, seed, noise=0.0, rng=None, shift=0.0):
    """Runs one episode; returns its return (less `shift` per step) and its transitions."""
    observation, _ = env.reset(seed=int(seed))
    steps = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    total = 0.0
    while True:
        action = linear_action(policy, observation)
        if noise > 0:
            action = np.clip(action + noise * rng.standard_normal(action.shape), -1.0, 1.0)
        next_observation, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(steps, (observation, action, reward, terminated, truncated)):
            steps[key].append(value)
        total += reward - shift
        observation = next_observation
        if terminated or truncated:
            # D4RL's flags: `terminals` for a true end (the hopper fell), `timeouts` for the end
            # of the time limit, where the task would have gone on.
            steps["timeouts"][-1] = bool(truncated and not terminated)
            return total, steps


def train_ars(env, config, iterations, seed):
    """ARS V2-t; returns the policy after every iteration (weights, observation mean and std)."""
    rng = np.random.default_rng(seed)
    observation_size = env.observation_space.shape[0]
    action_size = env.action_space.shape[0]
    weights = np.zeros((action_size, observation_size))
    stats = RunningStats(observation_size)
    snapshots = [(weights.copy(), *stats.mean_std())]
    for iteration in range(iterations):
        mean, std = stats.mean_std()
        deltas = rng.standard_normal((config["directions"], action_size, observation_size))
        seeds = rng.integers(2**31, size=config["directions"])
        returns = np.zeros((config["directions"], 2))
        visited = []
        for k, delta in enumerate(deltas):
            for j, sign in enumerate((1.0, -1.0)):
                # Both mirror images start from the same initial state.
                policy = (weights + sign * config["noise"] * delta, mean, std)
                returns[k, j], steps = rollout(env, policy, seeds[k], shift=config["shift"])
                visited.append(np.array(steps["observations"]))
        best = np.argsort(-returns.max(axis=1))[: config["top"]]
        spread = returns[best].std() or 1.0
        difference = returns[best, 0] - returns[best, 1]
        weights = weights + config["step_size"] / (config["top"] * spread) * np.einsum(
            "k,kij->ij", difference, deltas[best]
        )
        stats.update(np.concatenate(visited))
        snapshots.append((weights.copy(), *stats.mean_std()))
        if iteration % 10 == 9 or iteration == iterations - 1:
            check, _ = rollout(env, snapshots[-1], rng.integers(2**31))
            print(f"  ARS iteration {iteration + 1}/{iterations}: return {check:.0f}")
    return snapshots


"""
## D4RL-style datasets

* `medium`: the final ARS policy with a little Gaussian action noise (standard deviation 0.1).
* `medium-replay`: rollouts of the policy after each ARS iteration, from the first (all zeros)
  to the last, with exploration noise decaying linearly from 1.0 to 0.05: the data an agent
  collects while it learns, as in a replay buffer.

Each holds `observations`, `actions`, `rewards`, `terminals` and `timeouts` as D4RL's do, whole
episodes only. Everything is derived from `--data-seed`, so a second run finds the same files in
the cache.
"""


def collect(env, snapshots, name, steps, seed):
    rng = np.random.default_rng([seed, DATASETS.index(name)])
    if name == "medium":
        schedule = [(snapshots[-1], MEDIUM_NOISE, steps)]
    else:
        noises = np.linspace(*REPLAY_NOISE, len(snapshots))
        quotas = np.diff(np.linspace(0, steps, len(snapshots) + 1).round()).astype(int)
        schedule = list(zip(snapshots, noises, quotas))
    data = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for policy, noise, quota in schedule:
        collected = 0
        while collected < quota:
            _, episode = rollout(env, policy, rng.integers(2**31), noise, rng)
            for key in data:
                data[key] += episode[key]
            collected += len(episode["rewards"])
    return {
        "observations": np.array(data["observations"], "float32"),
        "actions": np.array(data["actions"], "float32"),
        "rewards": np.array(data["rewards"], "float32"),
        "terminals": np.array(data["terminals"], bool),
        "timeouts": np.array(data["timeouts"], bool),
    }


def load_dataset(name, dataset, args):
    """The dataset, from the cache or collected (training ARS first, cached too)."""
    env = make_env(name, args.episode_steps)  # first: exits clearly if MuJoCo cannot start
    import gymnasium

    config = {
        "env": ENVS[name]["id"],
        "gymnasium": gymnasium.__version__,
        "seed": args.data_seed,
        "ars": ENVS[name]["ars"],
        "iterations": args.ars_iterations or ENVS[name]["ars_iterations"],
        "episode_steps": args.episode_steps,
        "noise": (MEDIUM_NOISE, REPLAY_NOISE),
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(os.path.expanduser(args.cache_dir), "keras_aaren")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{dataset}-{args.dataset_steps}-{key}.npz")
    if os.path.exists(path):
        env.close()
        with np.load(path) as cached:
            return dict(cached)
    policy_path = os.path.join(folder, f"{name}-ars-{key}.npz")
    if os.path.exists(policy_path):
        with np.load(policy_path) as cached:
            snapshots = list(zip(cached["weights"], cached["mean"], cached["std"]))
    else:
        print(f"{name}: training the behaviour policy with ARS ({config['iterations']} iterations)")
        snapshots = train_ars(env, ENVS[name]["ars"], config["iterations"], args.data_seed)
        weights, mean, std = (np.stack(part) for part in zip(*snapshots))
        np.savez_compressed(policy_path, weights=weights, mean=mean, std=std)
    print(f"{name}: collecting {dataset} ({args.dataset_steps} steps)")
    data = collect(env, snapshots, dataset, args.dataset_steps, args.data_seed)
    env.close()
    np.savez_compressed(path, **data)
    return data


def split_episodes(data):
    ends = np.flatnonzero(data["terminals"] | data["timeouts"]) + 1
    starts = np.concatenate([[0], ends[:-1]])
    return [
        {key: data[key][start:end] for key in ("observations", "actions", "rewards")}
        for start, end in zip(starts, ends)
    ]


"""
## Tokens

The Decision Transformer reads a trajectory as tokens, three per timestep: the return still to
come (return-to-go), the state, the action; it predicts each action from the tokens up to and
including its state. Here every token is one feature vector: the return-to-go, state and action
slots (only the token's own slot filled), a one-hot token type, and the timestep. The model
swaps the timestep for a learned embedding of it, and its first `Dense` layer over the vector is
then exactly the DT's three linear embeddings (each with its own bias, from the one-hot type)
plus a learned embedding of the timestep, as in the DT. All of this acts on each token alone,
so the model reads a window of K timesteps (3K tokens), a whole episode, or one token at a time.
"""


def to_tokens(returns_to_go, states, actions, timesteps):
    """`(..., T)`, `(..., T, S)`, `(..., T, A)`, `(..., T)` to tokens `(..., 3T, 1+S+A+3+1)`."""
    *lead, steps, state_size = states.shape
    action_size = actions.shape[-1]
    offset = 1 + state_size + action_size
    tokens = np.zeros((*lead, steps, 3, offset + 4), "float32")
    tokens[..., 0, 0] = returns_to_go
    tokens[..., 1, 1 : 1 + state_size] = states
    tokens[..., 2, 1 + state_size : offset] = actions
    for kind in range(3):
        tokens[..., kind, offset + kind] = 1.0
    tokens[..., -1] = timesteps[..., None]
    return tokens.reshape(*lead, 3 * steps, offset + 4)


def returns_to_go(rewards):
    return np.cumsum(rewards[::-1])[::-1]


def trajectory(episode, start, steps, length, state_mean, state_std):
    """Tokens, targets and loss weights of `steps` timesteps from `start`, zero-padded at the end
    to `length` timesteps. The model is causal, so padding after the real tokens changes nothing
    before them; the weights keep it and every non-state token out of the loss."""
    real = slice(start, start + steps)
    rtg = np.zeros(length, "float32")
    states = np.zeros((length, episode["observations"].shape[1]), "float32")
    actions = np.zeros((length, episode["actions"].shape[1]), "float32")
    timesteps = np.zeros(length, "float32")
    rtg[:steps] = returns_to_go(episode["rewards"])[real] / RETURN_SCALE
    states[:steps] = (episode["observations"][real] - state_mean) / state_std
    actions[:steps] = episode["actions"][real]
    timesteps[:steps] = np.arange(start, start + steps)
    targets = np.zeros((length, 3, actions.shape[1]), "float32")
    targets[:, 1] = actions  # the output at each state token predicts that timestep's action
    weights = np.zeros((length, 3), "float32")
    weights[:steps, 1] = 1.0
    return (
        to_tokens(rtg, states, actions, timesteps),
        targets.reshape(3 * length, -1),
        weights.reshape(3 * length),
    )


class Trajectories(keras.utils.PyDataset):
    """Batches of `(tokens, target actions, loss weights)` for `model.fit`.

    With `context`, random windows of that many timesteps, sampled like the DT does (an episode
    in proportion to its length, then a start in it); without, whole episodes from t=0, padded to
    `length` timesteps.
    """

    def __init__(self, episodes, stats, batch_size, steps, length, context=None, seed=0):
        super().__init__()
        self.episodes, self.stats = episodes, stats
        self.batch_size, self.steps, self.length, self.context = batch_size, steps, length, context
        self.seed, self.epoch = seed, 0
        sizes = np.array([len(e["rewards"]) for e in episodes], "float64")
        self.probabilities = sizes / sizes.sum()

    def __len__(self):
        return self.steps

    def on_epoch_end(self):
        self.epoch += 1

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        picks = rng.choice(len(self.episodes), self.batch_size, p=self.probabilities)
        batch = []
        for pick in picks:
            episode = self.episodes[pick]
            size = len(episode["rewards"])
            if self.context is None:
                batch.append(trajectory(episode, 0, size, self.length, *self.stats))
            else:
                start = int(rng.integers(size))
                steps = min(self.context, size - start)
                batch.append(trajectory(episode, start, steps, self.context, *self.stats))
        return tuple(np.stack(part) for part in zip(*batch))


"""
## The models

`TimestepEmbedding` replaces the timestep feature of each token by its learned embedding. The
rest is the examples' shared encoder (`baselines.encoder`): a `Dense` projection to the model
width (the token embeddings), then either `AarenBlock`s or post-norm blocks of causal
`keras.layers.MultiHeadAttention`, of the same width and depth, without the sinusoidal
positions (the timestep embedding says where a token is in the episode, whether the model sees a
window or all of it) and without masking (padding only ever follows the real tokens, which a
causal model never lets it reach). A `tanh` head reads an action out of every token; only those
at state tokens enter the loss, through `model.fit`'s `sample_weight`, which every backend
applies alike.
"""


@keras.saving.register_keras_serializable(package="examples")
class TimestepEmbedding(keras.layers.Layer):
    """Replaces the last feature of each token (its timestep) by a learned embedding."""

    # Each token is embedded alone: the layer streams (`keras_aaren.streaming`).
    acts_per_timestep = True

    def __init__(self, max_timestep, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.max_timestep, self.output_dim = max_timestep, output_dim
        self.embedding = keras.layers.Embedding(max_timestep, output_dim, name="table")

    def build(self, input_shape):
        self.embedding.build(input_shape[:-1])

    def call(self, tokens):
        # Timesteps past the table (an episode longer than any in training) share its last row.
        steps = keras.ops.clip(keras.ops.round(tokens[..., -1]), 0, self.max_timestep - 1)
        embedded = self.embedding(keras.ops.cast(steps, "int32"))
        return keras.ops.concatenate([tokens[..., :-1], keras.ops.cast(embedded, tokens.dtype)], -1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] - 1 + self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "max_timestep": self.max_timestep,
            "output_dim": self.output_dim,
        }


def build_model(kind, features, action_size, args, name):
    tokens = keras.Input((None, features))
    embedded = TimestepEmbedding(args.episode_steps, args.width)(tokens)
    hidden = encoder(
        embedded,
        kind,
        width=args.width,
        depth=args.depth,
        summarize=False,
        causal=True,
        positions=False,
        masking=False,
        query_initializer=args.query_initializer,
    )
    actions = keras.layers.Dense(action_size, activation="tanh", name="action")(hidden)
    return keras.Model(tokens, actions, name=name)


def train(model, data, seed, args):
    keras.utils.set_random_seed(seed)
    total = args.epochs * args.steps_per_epoch
    warmup = max(1, total // 10)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        max(1, total - warmup),
        alpha=0.1,
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, clipnorm=0.25), loss="mse"
    )
    start = time.perf_counter()
    history = model.fit(data, epochs=args.epochs, verbose=2 if args.quick else 1)
    return history.history["loss"], time.perf_counter() - start


"""
## Acting in the simulator

At each step the policy is given the return still wanted (the target less the rewards so far),
the state and the timestep, and answers an action. Two ways to run the same trained model:

* **window**: rebuild the last K timesteps as 3K tokens and run the parallel model on them (how
  the DT acts; the only way for softmax attention, whose cost grows with its context);
* **stream**: `keras_aaren.streaming.make_step_function` turns the Aaren model into a step
  `tokens, state -> outputs, state`. Each decision feeds the timestep's new tokens in one call
  (`tokens_per_call=3`: the previous action's, the return-to-go's, the state's) and reads the
  action from the last. The state has a fixed size and carries the whole episode, not just K
  steps, so the stream sees more than the window for the same cost per step.

Both act on a batch: the evaluation episodes of a seed run side by side, one environment each,
and every timestep is one decision for all of them (a stream's step takes `batch_size`). The
latency of a decision is timed apart, on one episode acted on alone, as a deployed policy
makes its decisions.
"""


class WindowPolicy:
    """Each decision runs the parallel model on the last K timesteps of every episode in the
    batch, as 3K tokens padded at the end (one shape, so the prediction compiles once)."""

    def __init__(self, model, context, state_size, action_size, batch_size=1):
        self.model, self.context, self.batch_size = model, context, batch_size
        self.sizes = (state_size, action_size)
        # Compile the prediction before the episode, so that latencies are those of acting.
        features = state_size + action_size + 5
        model.predict_on_batch(np.zeros((batch_size, 3 * context, features), "float32"))

    def reset(self):
        self.rtg, self.states, self.actions, self.timesteps = [], [], [], []

    def memory(self):
        """Bytes kept between decisions per episode: the last K timesteps' tokens, recomputed
        at each decision."""
        return 3 * self.context * (1 + sum(self.sizes) + 4) * 4

    def act(self, rtg, state, timestep):
        """`rtg` `(batch,)` and `state` `(batch, S)` at `timestep`; returns `(batch, A)`."""
        self.rtg.append(rtg)
        self.states.append(state)
        self.actions.append(np.zeros((self.batch_size, self.sizes[1]), "float32"))
        self.timesteps.append(np.full(self.batch_size, timestep, "float32"))
        steps = min(len(self.rtg), self.context)
        padding = ((0, 0), (0, self.context - steps))

        def window(values):
            stacked = np.stack(values[-steps:], axis=1)
            return np.pad(stacked, padding + ((0, 0),) * (stacked.ndim - 2))

        parts = (self.rtg, self.states, self.actions, self.timesteps)
        tokens = to_tokens(*(window(values) for values in parts))
        output = self.model.predict_on_batch(tokens)
        self.actions[-1] = np.asarray(output)[:, 3 * (steps - 1) + 1]
        return self.actions[-1]


class StreamPolicy:
    """Each decision is one call of a compiled step over the timestep's new tokens: the previous
    action, the return-to-go and the state (at t = 0, the last two)."""

    def __init__(self, model, state_size, action_size, batch_size=1):
        self.first = streaming.make_step_function(model, batch_size, tokens_per_call=2)
        self.step = streaming.make_step_function(model, batch_size, tokens_per_call=3)
        self.sizes, self.batch_size = (state_size, action_size), batch_size
        # Compile both steps before the episode, so that latencies are those of acting.
        self.reset()
        zeros = (np.zeros(batch_size, "float32"), np.zeros((batch_size, state_size), "float32"))
        self.act(*zeros, 0)
        self.act(*zeros, 1)
        self.reset()

    def reset(self):
        self.states = self.step.initial_states()
        self.previous = None
        self.tokens, self.outputs = [], []

    def act(self, rtg, state, timestep):
        """`rtg` `(batch,)` and `state` `(batch, S)` at `timestep`; returns `(batch, A)`."""
        tokens = [self.token(0, rtg=rtg, timestep=timestep), self.token(1, state, timestep)]
        step = self.first
        if self.previous is not None:
            tokens.insert(0, self.token(2, action=self.previous, timestep=timestep - 1))
            step = self.step
        self.tokens += tokens
        outputs, self.states = step(np.stack(tokens, axis=1), self.states)
        self.previous = keras.ops.convert_to_numpy(outputs)[:, -1]
        self.outputs.append(self.previous)
        return self.previous

    def memory(self):
        """Bytes kept between decisions per episode: the state, the same at every step."""
        return sum(int(np.asarray(s).nbytes) for s in self.states) // self.batch_size

    def token(self, kind, state=None, timestep=0, rtg=None, action=None):
        """The `(batch, features)` tokens of one kind: 0 return-to-go, 1 state, 2 action."""
        state_size, action_size = self.sizes
        batch = self.batch_size
        tokens = to_tokens(
            np.zeros((batch, 1), "float32") if rtg is None else rtg[:, None],
            np.zeros((batch, 1, state_size), "float32") if state is None else state[:, None],
            np.zeros((batch, 1, action_size), "float32") if action is None else action[:, None],
            np.full((batch, 1), timestep, "float32"),
        )
        return tokens[:, kind]


def run_episodes(envs, policy, target, seeds, state_mean, state_std):
    """One episode toward `target` in each of `envs` (seeded by `seeds`), all acted on together
    by `policy`, one batched decision per timestep. An episode that ends keeps its last state in
    the batch, unused, until the last one ends. Returns the returns, the lengths and the latency
    of each decision."""
    observations = np.stack([env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)])
    policy.reset()
    wanted = np.full(len(envs), target)
    totals, lengths, latencies = np.zeros(len(envs)), np.zeros(len(envs), int), []
    running = np.ones(len(envs), bool)
    for timestep in range(envs[0].spec.max_episode_steps):
        states = ((observations - state_mean) / state_std).astype("float32")
        start = time.perf_counter()
        actions = policy.act((wanted / RETURN_SCALE).astype("float32"), states, timestep)
        latencies.append(time.perf_counter() - start)
        for i in np.flatnonzero(running):
            observations[i], reward, terminated, truncated, _ = envs[i].step(
                np.asarray(actions[i], "float64")
            )
            totals[i] += reward
            wanted[i] -= reward
            lengths[i] = timestep + 1
            running[i] = not (terminated or truncated)
        if not running.any():
            break
    return totals.tolist(), lengths.tolist(), latencies


def check_stream(policy, model):
    """Largest difference between the streamed actions of the last episodes and the parallel
    model's outputs at the same state tokens, run on every token the stream was fed."""
    tokens = np.stack(policy.tokens, axis=1)
    parallel = keras.ops.convert_to_numpy(model(tokens, training=False))[:, 1::3]
    return float(np.abs(parallel - np.stack(policy.outputs, axis=1)).max())


"""
## Putting it together

For each environment and dataset: train the windowed Transformer and Aaren DTs on windows of K
steps and an Aaren DT on whole episodes from t=0, evaluate each at both target returns, and
compare with the return of the behaviour policy that collected the data.
"""


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    results, latencies, max_diffs = [], {}, []
    for name in args.envs:
        for dataset in args.datasets:
            data = load_dataset(name, dataset, args)
            episodes = split_episodes(data)
            behaviour = [float(e["rewards"].sum()) for e in episodes]
            state_mean = data["observations"].mean(axis=0)
            state_std = data["observations"].std(axis=0) + 1e-6
            stats = (state_mean, state_std)
            state_size, action_size = data["observations"].shape[1], data["actions"].shape[1]
            print(
                f"{name}-{dataset}: {len(data['rewards'])} steps, {len(episodes)} episodes, "
                f"behaviour return {mean_std(behaviour, 0)}"
            )
            results.append(
                {
                    "env": name,
                    "dataset": dataset,
                    "model": "behaviour policy",
                    "mode": "dataset",
                    "target": None,
                    "returns": behaviour,
                    "seeds": [],
                }
            )
            envs = [make_env(name, args.episode_steps) for _ in range(args.episodes)]
            # Return-to-go, state, action, token type (3), timestep.
            features = 1 + state_size + action_size + 3 + 1
            for seed in args.seeds:
                windows = Trajectories(
                    episodes,
                    stats,
                    args.batch_size,
                    args.steps_per_epoch,
                    args.context,
                    context=args.context,
                    seed=seed,
                )
                whole = Trajectories(
                    episodes,
                    stats,
                    args.episode_batch_size,
                    args.steps_per_epoch,
                    args.episode_steps,
                    seed=seed,
                )
                runs = []
                for kind, data_source, label in (
                    ("transformer", windows, "transformer DT"),
                    ("aaren", windows, "aaren DT"),
                    ("aaren", whole, "aaren DT, whole episodes"),
                ):
                    model = build_model(kind, features, action_size, args, kind)
                    print(f"{name}-{dataset}, seed {seed}: {label} ({model.count_params()} params)")
                    losses, seconds = train(model, data_source, seed, args)
                    modes = ["window"] if data_source is windows else []
                    modes += ["stream"] if kind == "aaren" else []
                    runs += [(label, mode, model, losses, seconds) for mode in modes]
                for label, mode, model, losses, seconds in runs:
                    sizes = (state_size, action_size)
                    # One episode alone times the decisions, as a deployed policy makes them;
                    # the returns come from all the episodes acted on as one batch.
                    alone, together = (
                        WindowPolicy(model, args.context, *sizes, batch_size)
                        if mode == "window"
                        else StreamPolicy(model, *sizes, batch_size)
                        for batch_size in (1, args.episodes)
                    )
                    targets = ENVS[name]["targets"]
                    episode_seeds = [10_000 * seed + episode for episode in range(args.episodes)]
                    *_, decisions = run_episodes(
                        envs[:1], alone, targets[0], episode_seeds[:1], *stats
                    )
                    latencies.setdefault((name, f"{label}, {mode}"), decisions)
                    for target in targets:
                        returns, lengths, _ = run_episodes(
                            envs, together, target, episode_seeds, *stats
                        )
                        if mode == "stream":
                            max_diffs.append(check_stream(together, model))
                        results.append(
                            {
                                "env": name,
                                "dataset": dataset,
                                "model": label,
                                "mode": mode,
                                "target": target,
                                "seed": seed,
                                "returns": returns,
                                "lengths": lengths,
                                "params": model.count_params(),
                                "final_loss": losses[-1],
                                "seconds": seconds,
                                "latency_ms": 1e3 * float(np.median(decisions)),
                                "memory_bytes": alone.memory(),
                            }
                        )
                        print(
                            f"  {label:26s} {mode:6s} target {target:6.0f}: return "
                            f"{np.mean(returns):8.1f} (normalised "
                            f"{normalized_score(name, np.mean(returns)):5.1f})"
                        )
            for env in envs:
                env.close()
    max_diff = max(max_diffs) if max_diffs else None
    if max_diff is not None:
        print(f"streamed vs parallel actions, largest difference: {max_diff:.2e}")
    paths = save(results, latencies, args)
    return {"results": results, "max_diff": max_diff, **paths}


"""
## Results
"""


def table(results):
    """One row per model, way of acting and target: the mean return of each seed's episodes,
    then the mean ± std of those over the seeds (for the behaviour policy, over the dataset's
    episodes), the training time and the median decision latency."""
    lines = [
        "| env | dataset | model | acting | target | return | normalised | parameters | "
        "training | latency per step | kept between steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for row in results:
        key = (row["env"], row["dataset"], row["model"], row["mode"], row["target"])
        groups.setdefault(key, []).append(row)
    for (env, dataset, model, mode, target), rows in groups.items():
        returns = [np.mean(r["returns"]) for r in rows] if target else rows[0]["returns"]
        scores = [normalized_score(env, value) for value in returns]
        if target is None:
            params = training = latency = memory = "-"
        else:
            params = rows[0]["params"]
            training = f"{np.median([r['seconds'] for r in rows]):.0f} s"
            latency = f"{np.median([r['latency_ms'] for r in rows]):.2f} ms"
            memory = f"{rows[0]['memory_bytes']} bytes"
        lines.append(
            f"| {env} | {dataset} | {model} | {mode} | "
            f"{'-' if target is None else int(target)} | {mean_std(returns, 0)} | "
            f"{mean_std(scores, 1)} | {params} | {training} | {latency} | {memory} |"
        )
    return lines


def save(results, latencies, args):
    stem = os.path.join(args.output_dir, "decision_transformer")
    paths = write_outputs(stem, results, table(results), plot_returns)
    latency_path = f"{stem}_latency.png"
    plot_latency(latencies, latency_path)
    return {**paths, "latency_plot": latency_path}


def plot_returns(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["env"], r["dataset"]) for r in results))
    columns = min(2, len(panels))
    height = -(-len(panels) // columns)
    fig, axes = plt.subplots(height, columns, figsize=(6 * columns, 4 * height), squeeze=False)
    for ax, (env, dataset) in zip(axes.flat, panels):
        rows = [r for r in results if (r["env"], r["dataset"]) == (env, dataset)]
        for curve in dict.fromkeys((r["model"], r["mode"]) for r in rows if r["target"]):
            points = {}
            for r in rows:
                if (r["model"], r["mode"]) == curve:
                    points.setdefault(r["target"], []).append(np.mean(r["returns"]))
            targets = sorted(points)
            scores = [normalized_score(env, np.mean(points[t])) for t in targets]
            ax.plot(
                [normalized_score(env, t) for t in targets], scores, "o-", label=", ".join(curve)
            )
        behaviour = next(r for r in rows if r["target"] is None)["returns"]
        ax.axhline(
            normalized_score(env, np.mean(behaviour)),
            color="gray",
            linestyle=":",
            label="behaviour policy",
        )
        ax.set_xlabel("target return (normalised)")
        ax.set_ylabel("return (normalised)")
        ax.set_title(f"{env}-{dataset}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(latencies, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(env for env, _ in latencies))
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 3.8), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for (name, label), seconds in latencies.items():
            if name == env:
                ax.plot(1e3 * np.array(seconds), label=label, linewidth=0.8)
        ax.set_xlabel("episode step")
        ax.set_ylabel("decision latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{env}: one episode, first seed")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
