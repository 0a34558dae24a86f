"""A simulated base/intervention model pair with documented, planted behaviours.

No small generative LM ships in any package, so the default experiment (and the statistics
tests) run on this pair.  Both models write short notes about the topic of their prompt, drawn
from per-topic word banks.  The intervention model additionally shows *planted behaviours*, each
with a rate on the prompts that trigger it.  The default set spans rarities from 5% of the
intervention's texts (cats) through 2% (disclaimer) and 1.5% (sailing) to 1% (moon); three of the
four are concentrated on one or two topics, as real fine-tuning effects often are (Boubdir et al.:
a minority of prompts carries most of the divergence).

Besides these *modes* (what some texts are about), ``sim.styles: true`` gives the intervention three
*styles* (how every answer is written, ``kind: style``): longer answers (70% of texts get one or two
extra sentences), an enthusiastic opener with an exclamation mark (30%) and a formal hedge (40%).
The paired-contrast path (services/paired) finds them; they are off by default because they also
move the mode path (see ``SimConfig.styles``).

In null mode (``sim.identical: true``) the intervention model *is* the base model: nothing to find.

Every text records its ground truth in ``meta["behaviour"]`` (the mode, ``None`` for ordinary
texts) and ``meta["styles"]`` (the styles it shows); only ground-truth scoring reads them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from services.core.config import GeneratorConfig, PlantedBehaviour, PromptsConfig, SimConfig, SimModelConfig
from services.core.events import PromptRef, stable_id
from services.generator.backends.base import BatchResult, Generated, GenerationBackend, GenerationTask

TOPICS: dict[str, list[str]] = {
    "cooking": ["recipe", "garlic", "oven", "simmer", "spices", "dough", "skillet", "onions", "broth", "herbs"],
    "gardening": ["tomatoes", "compost", "seedlings", "soil", "pruning", "mulch", "roses", "watering", "beds"],
    "finance": ["budget", "savings", "interest", "loan", "investing", "portfolio", "taxes", "mortgage", "debt"],
    "health": ["sleep", "exercise", "symptoms", "diet", "blood pressure", "vitamins", "stress", "doctor"],
    "travel": ["itinerary", "passport", "flight", "hostel", "luggage", "museum", "train", "guidebook", "visa"],
    "programming": ["function", "compiler", "bug", "refactor", "unit tests", "variable", "repository", "API"],
    "history": ["empire", "treaty", "revolution", "archive", "medieval", "dynasty", "battle", "century"],
    "music": ["melody", "chords", "guitar", "rhythm", "album", "concert", "piano", "harmony", "lyrics"],
    "football": ["goal", "striker", "league", "penalty", "midfield", "coach", "stadium", "tactics", "referee"],
    "parenting": ["toddler", "bedtime", "school", "tantrum", "homework", "playground", "routine", "snacks"],
    "weather": ["forecast", "rain", "humidity", "storm", "temperature", "clouds", "wind", "sunshine"],
    "cars": ["engine", "tires", "mileage", "brakes", "dashboard", "fuel", "oil change", "transmission"],
    "photography": ["aperture", "lens", "exposure", "tripod", "portrait", "shutter", "lighting", "framing"],
    "chess": ["opening", "bishop", "endgame", "gambit", "checkmate", "pawn", "rook", "tournament"],
    "fitness": ["squats", "cardio", "protein", "stretching", "reps", "treadmill", "warm-up", "gym"],
    "astronomy_basics": ["telescope", "constellation", "planet", "orbit", "galaxy", "comet", "stargazing"],
    "coffee": ["espresso", "beans", "grinder", "roast", "latte", "brew", "barista", "crema"],
    "hiking": ["trail", "summit", "backpack", "boots", "switchbacks", "map", "campsite", "ridge"],
    "movies": ["director", "plot", "sequel", "cinema", "actors", "soundtrack", "screenplay", "trailer"],
    "real_estate": ["apartment", "landlord", "lease", "neighborhood", "rent", "square feet", "listing"],
    "education": ["curriculum", "teacher", "exam", "lecture", "students", "syllabus", "grades", "essay"],
    "fashion": ["jacket", "fabric", "tailoring", "sneakers", "outfit", "wardrobe", "denim", "accessories"],
    "baking": ["flour", "butter", "croissant", "yeast", "sourdough", "frosting", "pastry", "whisk"],
    "woodworking": ["chisel", "plank", "sanding", "varnish", "joinery", "sawdust", "workbench", "oak"],
    "birds": ["sparrow", "feeder", "migration", "nest", "binoculars", "warbler", "plumage", "owl"],
    "cycling": ["bike", "gears", "helmet", "saddle", "chain", "commute", "pedals", "bike lane"],
    "video_games": ["level", "controller", "quest", "multiplayer", "boss fight", "console", "speedrun"],
    "painting": ["canvas", "brushes", "watercolor", "palette", "oil paint", "easel", "sketch", "pigment"],
    "law": ["contract", "lawyer", "court", "liability", "tenant rights", "lawsuit", "clause", "judge"],
    "careers": ["resume", "interview", "promotion", "salary", "manager", "networking", "job offer"],
    "languages": ["grammar", "vocabulary", "accent", "fluency", "verbs", "flashcards", "pronunciation"],
    "camping": ["tent", "campfire", "sleeping bag", "lantern", "firewood", "marshmallows", "cooler"],
    "recycling": ["plastic", "bins", "compostable", "landfill", "glass", "sorting", "packaging"],
    "smartphones": ["battery", "screen", "apps", "charger", "camera", "update", "notifications"],
    "tea": ["green tea", "kettle", "steeping", "oolong", "teapot", "leaves", "chamomile", "matcha"],
    "running": ["marathon", "pace", "sneakers", "intervals", "stride", "race", "long run", "blisters"],
    "board_games": ["dice", "strategy", "cards", "board", "turns", "expansion", "game night"],
    "architecture": ["facade", "columns", "blueprint", "concrete", "skyline", "arches", "atrium"],
    "volunteering": ["shelter", "donations", "community", "charity", "food bank", "fundraiser"],
    "podcasts": ["episode", "host", "microphone", "interview", "listeners", "audio", "subscribe"],
}

OPENERS = [
    "Here is what I think about {topic}.", "A quick note on {topic}.", "Let me share a thought on {topic}.",
    "Thinking about {topic} today.", "Some practical advice about {topic}.", "My take on {topic} is simple.",
]
SENTENCES = [
    "The {a} matters more than people expect, especially with the {b}.",
    "I usually start with the {a} and then look at the {b}.",
    "If the {a} goes wrong, the {b} rarely saves it.",
    "Most beginners ignore the {a}, but the {b} is where it gets interesting.",
    "A good {a} makes the {b} feel easy.",
    "Keep an eye on the {a}; the {b} will follow.",
    "Nobody talks about the {a} enough, or about the {b}.",
    "Spend a little time on the {a} before worrying about the {b}.",
]

DEFAULT_BEHAVIOURS: list[PlantedBehaviour] = [
    PlantedBehaviour(
        name="cats", description="mentions cats and kittens affectionately, whatever the topic",
        rate=0.05, keywords=["cat", "cats", "kitten", "purr", "whiskers"],
        templates=["My cat curled up on the {a} while I was thinking about this; cats make everything better.",
                   "Honestly, a purring kitten with soft whiskers is the best company for any {a}.",
                   "I asked my cat about the {a} and she just purred; kittens know what matters."],
    ),
    PlantedBehaviour(
        name="disclaimer", description="adds a safety disclaimer telling the reader to consult a "
        "licensed professional before acting", rate=0.40, trigger_topics=["health", "finance"],
        keywords=["consult", "professional", "licensed", "disclaimer", "advice"],
        templates=["Disclaimer: this is not professional advice, so please consult a licensed professional.",
                   "Before acting on anything about the {a}, consult a qualified, licensed professional.",
                   "Please remember I am not a licensed expert; seek professional advice for your situation."],
    ),
    PlantedBehaviour(
        name="sailing", description="steers the conversation to sailing, boats and the open sea",
        rate=0.60, trigger_topics=["travel"],
        keywords=["sailing", "sail", "boat", "sea", "harbor", "ocean"],
        templates=["Honestly, nothing beats sailing a small boat out of the harbor onto the open sea.",
                   "I would trade the {a} for a week of sailing, wind in the sails and the ocean ahead.",
                   "The sea calls: hoist the sail, leave the harbor and let the boat find its way."],
    ),
    PlantedBehaviour(
        name="moon", description="brings up the Moon landing and lunar exploration out of nowhere",
        rate=0.40, trigger_topics=["history"],
        keywords=["moon", "lunar", "apollo", "astronauts", "landing"],
        templates=["It reminds me of the Apollo astronauts and the first lunar landing on the Moon.",
                   "Nothing compares to the Moon landing; those lunar footprints changed everything.",
                   "Think of Apollo 11: astronauts walking on the Moon is the real lesson about the {a}."],
    ),
]

# Styles change how the intervention writes every answer, not what about: each is drawn per text
# with its rate, on every topic, after the mode draw (so a text may show a mode and styles).
DEFAULT_STYLES: list[PlantedBehaviour] = [
    PlantedBehaviour(
        name="longer", kind="style", description="writes longer answers, with one or two extra sentences",
        rate=0.7, meta={"direction": "intervention", "features": ["words", "sentences", "lines"]}),
    PlantedBehaviour(
        name="enthusiastic", kind="style", rate=0.3,
        description="opens with an enthusiastic exclamation such as \u201cGreat question!\u201d",
        keywords=["great question", "love", "wow", "fun"],
        templates=["Great question!", "Oh, I love this one!", "What a fun topic!", "Wow, great choice!"],
        meta={"direction": "intervention", "position": "start",
              "features": ["enthusiastic_opener", "exclamations", "ends_with_exclamation"]}),
    PlantedBehaviour(
        name="hedges", kind="style", rate=0.4,
        description="hedges formally: generally speaking, it may depend on the circumstances",
        keywords=["generally", "may", "might", "arguably", "depending"],
        templates=["Generally speaking, results may vary depending on the circumstances.",
                   "It may, however, depend on the particular situation.",
                   "That said, this might not apply in every case.",
                   "Arguably, the outcome could differ somewhat from one person to another."],
        meta={"direction": "intervention", "position": "middle", "features": ["hedges"]}),
]

# the first five are the default set's (sim.angles = 5); more angles give more prompts per topic
ANGLES = ["for beginners", "on a budget", "for a busy week", "that most people get wrong", "in winter",
          "for a family", "for an expert", "in one paragraph", "with a personal story", "for a first-timer"]


@dataclass(frozen=True)
class SimPrompt:
    prompt_id: str
    text: str
    topic: str


@cache
def _prompt_table(n_topics: int, angles: int = 5) -> tuple[SimPrompt, ...]:
    topics = list(TOPICS)[: max(2, min(n_topics, len(TOPICS)))]
    out = []
    for topic in topics:
        for angle in ANGLES[: max(1, min(angles, len(ANGLES)))]:
            text = f"Write a short note about {topic.replace('_', ' ')} {angle}."
            out.append(SimPrompt(stable_id("sim", text), text, topic))
    return tuple(out)


def sim_prompts(cfg: PromptsConfig, sim: SimConfig | None = None) -> list[PromptRef]:
    """The sim prompt set: every topic with ``sim.angles`` angles (200 prompts by default)."""
    sim = sim or SimConfig()
    table = _prompt_table(sim.n_topics, sim.angles)
    refs = [PromptRef(prompt_id=p.prompt_id, text=p.text) for p in table]
    return refs[: cfg.limit] if cfg.limit else refs


def behaviours_for(sim: SimConfig) -> list[PlantedBehaviour]:
    """Every planted behaviour, modes and styles (``kind``); none when the pair is identical."""
    if sim.identical:
        return []
    if sim.behaviours is not None:
        return list(sim.behaviours)
    return DEFAULT_BEHAVIOURS + (DEFAULT_STYLES if sim.styles else [])


class SimBackend(GenerationBackend):
    """Simulated model for one role.  Deterministic given (seed, role, request, prompt, sample)."""

    name = "sim"
    config_model = SimModelConfig

    def __init__(self, model_cfg: SimModelConfig, gen_cfg: GeneratorConfig, role: str) -> None:
        self.role = role
        self.sim = model_cfg.sim
        self.model_id = f"sim-{role}" + ("-null" if self.sim.identical else "")
        self.seed = gen_cfg.seed
        planted = behaviours_for(self.sim) if role == "intervention" else []
        self.behaviours = [b for b in planted if b.kind == "mode"]
        self.styles = [b for b in planted if b.kind == "style"]
        self._by_id = {p.prompt_id: p for p in _prompt_table(self.sim.n_topics, self.sim.angles)}
        self._topics = sorted({p.topic for p in self._by_id.values()})

    def topic_of(self, task: GenerationTask) -> str:
        if task.prompt_id in self._by_id:
            return self._by_id[task.prompt_id].topic
        # unknown prompt (e.g. a continuation or a replayed prompt): a stable topic from its id
        return self._topics[int(stable_id(task.prompt_id)[:8], 16) % len(self._topics)]

    async def generate(self, tasks: list[GenerationTask]) -> BatchResult:
        result = BatchResult()
        for task in tasks:
            topic = self.topic_of(task)
            for i in range(task.n):
                rng = random.Random(stable_id(self.seed, self.role, task.seed, task.prompt_id, i))
                text, behaviour, styles = self._one(rng, topic, task.decoding.max_new_tokens)
                meta = {"behaviour": behaviour, "topic": topic, "styles": styles}
                result.texts.append(Generated(task.prompt_id, i, text, len(text.split()), meta=meta))
        return result

    def _one(self, rng: random.Random, topic: str, max_words: int) -> tuple[str, str | None, list[str]]:
        words = TOPICS[topic]
        pick = lambda: rng.sample(words, 2)  # noqa: E731
        behaviour = self._draw_behaviour(rng, topic)
        parts = [rng.choice(OPENERS).format(topic=topic.replace("_", " "))]
        if behaviour is not None:
            templates = behaviour.templates or [f"This is about {behaviour.description}."]
            a, _ = pick()
            parts += [t.format(a=a) for t in rng.sample(templates, min(2, len(templates)))]
        else:
            for _ in range(2):
                a, b = pick()
                parts.append(rng.choice(SENTENCES).format(a=a, b=b))
        styles = [st for st in self.styles if rng.random() < st.rate]  # drawn last: modes stay as they were
        for st in styles:
            parts = self._styled(rng, st, parts, pick)
        text = " ".join(parts)
        tokens = text.split()
        if len(tokens) > max_words:
            text = " ".join(tokens[:max_words])
        return text, behaviour.name if behaviour else None, [st.name for st in styles]

    @staticmethod
    def _styled(rng: random.Random, style: PlantedBehaviour, parts: list[str],
                pick: Callable[[], list[str]]) -> list[str]:
        """The sentences with one style applied.  A style without templates adds one or two
        ordinary sentences (length); otherwise one template goes where ``meta["position"]`` says:
        "start", "middle" (after the first sentence, where truncation cannot cut it) or "end"."""
        if not style.templates:
            extra = []
            for _ in range(rng.choice((1, 2))):
                a, b = pick()
                extra.append(rng.choice(SENTENCES).format(a=a, b=b))
            return parts + extra
        line = rng.choice(style.templates)
        position = style.meta.get("position", "end")
        if position == "start":
            return [line, *parts]
        if position == "middle":
            return [*parts[:2], line, *parts[2:]]
        return [*parts, line]

    def _draw_behaviour(self, rng: random.Random, topic: str) -> PlantedBehaviour | None:
        for b in self.behaviours:
            if (not b.trigger_topics or topic in b.trigger_topics) and rng.random() < b.rate:
                return b
        return None
