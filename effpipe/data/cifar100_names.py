"""The 100 CIFAR-100 fine class names, in label order (the dataset's fine_label_names.txt).

tensorflow-datasets learns these names from the downloaded archive; a builder that
never saw it (tfds.testing.mock_data) only has "0".."99", so effpipe keeps its own copy.
"""

# One string, split once: a table of 100 names reads better on 12 lines than on 100.
FINE_LABEL_NAMES = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
    bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud
    cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox
    girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
    road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
    streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
    trout tulip turtle wardrobe whale willow_tree wolf woman worm
    """.split()
)
